# Construct server and worker image.
#   docker build -t construct .
#   docker run -p 8080:8080 -p 8081:8081 -v construct-data:/var/lib/construct construct
# runs `twistd construct` in embedded mode (SQLite in the volume). docker-compose.yml runs
# production mode (PostgreSQL, Redis, two instances, a worker) from this same image; the worker
# is the same image with the command `twistd --nodaemon --pidfile= construct-worker`.
# Settings: the CONSTRUCT_* variables of deploy/construct.env.example (secrets via *_FILE).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# obfs4proxy for --obfs4 (docs/operations.md, "Running in a censored network").
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends obfs4proxy \
 && rm -rf /var/lib/apt/lists/*

# The same layout as a host install (docs/operations.md): a venv in /opt/construct/venv,
# state in /var/lib/construct, a non-root system user.
RUN groupadd --system construct \
 && useradd --system --gid construct --home-dir /var/lib/construct --shell /usr/sbin/nologin construct \
 && python -m venv /opt/construct/venv \
 && install -d -o construct -g construct -m 0750 /var/lib/construct
ENV PATH=/opt/construct/venv/bin:$PATH

WORKDIR /usr/src/construct
COPY setup.py ./
COPY construct ./construct
COPY twisted ./twisted
# A regular (non-editable) install, so twistd finds the plugins in site-packages. Then build
# twisted/plugins/dropin.cache now, as root: at run time site-packages is not writable by the
# construct user, and a missing cache would be rebuilt (slowly, with a warning) at every start.
# The last two commands fail the build if either plugin is missing.
RUN pip install . \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && twistd construct --help >/dev/null \
 && twistd construct-worker --help >/dev/null \
 && cd / && rm -rf /usr/src/construct

# Listeners on all interfaces of the container (the code's defaults are loopback-only, which
# a published port cannot reach). /health and /metrics are unauthenticated: publish port 3000
# only to the host's loopback or a private network.
ENV CONSTRUCT_LISTEN=tcp:8080:interface=0.0.0.0 \
    CONSTRUCT_TCP=tcp:8081:interface=0.0.0.0 \
    CONSTRUCT_HEALTH=tcp:3000:interface=0.0.0.0 \
    CONSTRUCT_DATA_DIR=/var/lib/construct

USER construct
WORKDIR /var/lib/construct
VOLUME ["/var/lib/construct"]
EXPOSE 8080 8081 3000

# /health answers 200 when every dependency answers, 503 naming what is down; urlopen raises
# on anything but 2xx. (No curl in the slim image.) The worker overrides this in compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/health', timeout=4)"]

# twistd shuts down cleanly on SIGTERM (docker stop); --nodaemon keeps it in the foreground and
# logging to stdout, --pidfile= writes no pidfile.
STOPSIGNAL SIGTERM
CMD ["twistd", "--nodaemon", "--pidfile=", "construct"]
