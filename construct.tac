"""`twistd -ny construct.tac`: the `construct` server as a Twisted application file.

The same service tree as `twistd -n construct`, configured from the environment only: every
option comes from CONSTRUCT_<NAME> or CONSTRUCT_<NAME>_FILE (see deploy/construct.env.example),
so nothing secret needs to appear on a command line. Under systemd prefer the plugin form
(deploy/construct.service); this file is for running from a checkout or from tools that want an
application file.
"""

import os
import sys

# `twistd -y` executes this file with __file__ set, but does not put its directory on sys.path.
# From a checkout, make this tree's `construct` package importable (ahead of any installed copy);
# next to an installed package (no construct/ directory here) leave sys.path alone.
_here = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_here, "construct")) and _here not in sys.path:
    sys.path.insert(0, _here)

from twisted.application import service  # noqa: E402

from construct.tap import Options, makeService  # noqa: E402

# No arguments: Options.postOptions reads each setting from the environment (or its default).
options = Options()
options.parseOptions([])

# twistd starts its log observer after running this file: the privacy filter comes first.
from construct.logs import install_privacy_filter  # noqa: E402

install_privacy_filter(options["log-client-addresses"])

application = service.Application("construct")
makeService(options).setServiceParent(application)

# With a plugin, --log-format=json switches twistd's --logger; a .tac has no such hook, so set
# the observer on the application instead (twistd's own --logger, if given, still wins).
if options.get("log-format") == "json":
    from twisted.logger import ILogObserver

    from construct.logs import json_observer

    application.setComponent(ILogObserver, json_observer())
