"""Deployment artifacts: systemd units, construct.tac, and the Docker files in step with both."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from tests.processes import REPO, TWISTD, ServerProcess, process_env

DEPLOY = REPO / "deploy"
VENV_TWISTD = "/opt/construct/venv/bin/twistd"
GLOBAL_FLAGS = ["--nodaemon", "--pidfile="]
# Options that carry secrets: environment (files) only, never a command line (`ps` shows it).
SECRET_OPTIONS = {"database", "redis"}
VARIABLE = re.compile(r"\bCONSTRUCT_[A-Z][A-Z0-9_]*[A-Z0-9]\b")


# ---------------------------------------------------------------------------------------------
# helpers


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze is not installed: install Debian's systemd package "
            "(apt-get install --no-install-recommends systemd; .ci/run does this)",
            pytrace=False,
        )
    return path


def unit_files() -> list[Path]:
    return sorted(p for p in DEPLOY.iterdir() if p.suffix in (".service", ".socket"))


def dropin_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.service.d/*.conf"))


def real_twistd(tmp_path: Path) -> str:
    """An executable to stand in for the venv's twistd (systemd-analyze checks that it exists)."""
    candidate = Path(sys.executable).parent / "twistd"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("twistd")
    if found:
        return found
    stub = tmp_path / "twistd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return str(stub)


def stage(tmp_path: Path, with_dropins: bool) -> Path:
    """Copy the units (and optionally the drop-ins) with ExecStart pointing at a real twistd."""
    target = tmp_path / ("socket-activated" if with_dropins else "plain")
    target.mkdir()
    twistd = real_twistd(tmp_path)
    files = unit_files() + (dropin_files() if with_dropins else [])
    for source in files:
        destination = target / source.relative_to(DEPLOY)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(source.read_text().replace(VENV_TWISTD, twistd))
    return target


def verify(directory: Path, unit: str) -> list[str]:
    """`systemd-analyze verify`; every complaint about our files (it exits 0 on many of them)."""
    result = subprocess.run(
        [systemd_analyze(), "verify", str(directory / unit)], capture_output=True, text=True, timeout=60
    )
    ours = [p.name for p in unit_files()] + [unit, str(directory)]
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in ours)]
    if result.returncode != 0 and not complaints:
        complaints = [f"exit status {result.returncode}: {result.stderr.strip()}"]
    return complaints


def exec_starts(paths: list[Path]) -> dict[str, list[list[str]]]:
    """ExecStart= command lines by file name (the empty reset line of a drop-in left out)."""
    found: dict[str, list[list[str]]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("ExecStart=") and line != "ExecStart=":
                found.setdefault(path.name, []).append(shlex.split(line[len("ExecStart="):]))
    return found


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def compose_commands() -> dict[str, list[str]]:
    """The commands of the services built from this repository (not postgres, redis)."""
    services = compose()["services"].items()
    built = {name: service for name, service in services if "build" in service}
    assert all("command" in service for service in built.values()), "give every Construct service a command"
    return {name: service["command"] for name, service in built.items()}


def dockerfile_cmd() -> list[str]:
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, "the Dockerfile should have exactly one CMD"
    return json.loads(lines[0][len("CMD "):])


def plugins() -> dict[str, object]:
    return {maker.tapname: maker for maker in getPlugins(IServiceMaker)}


def split_twistd(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """twistd's own flags, the subcommand, and the subcommand's arguments."""
    position = next(i for i, arg in enumerate(argv[1:], 1) if not arg.startswith("-"))
    return argv[1:position], argv[position], argv[position + 1:]


def option_names(arguments: list[str], maker: object) -> list[str]:
    """The --long options in `arguments`, checked against the plugin's Options as twistd would."""
    options = maker.options()
    parameters = {o[:-1] for o in options.longOpt if o.endswith("=")}
    flags = {o for o in options.longOpt if not o.endswith("=")}
    names, i = [], 0
    while i < len(arguments):
        arg = arguments[i]
        assert arg.startswith("--"), f"unexpected argument {arg!r} for {maker.tapname}"
        name, equals, _ = arg[2:].partition("=")
        assert name in parameters | flags, f"twistd {maker.tapname} has no option --{name}"
        names.append(name)
        # "--name=value" and flags take one word, "--name value" two.
        i += 1 if (equals or name in flags) else 2
    return names


def allowed_variables() -> set[str]:
    from construct.tap import Options as ServerOptions
    from construct.worker_tap import Options as WorkerOptions

    settings = ServerOptions.settings + WorkerOptions.settings
    return {setting.variable for setting in settings}


def deployment_texts() -> dict[str, str]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    files += [REPO / "Dockerfile", REPO / "docker-compose.yml", REPO / "construct.tac", REPO / "docs" / "operations.md"]
    return {str(p.relative_to(REPO)): p.read_text() for p in files}


# ---------------------------------------------------------------------------------------------
# (a) systemd


def units_to_verify() -> list[str]:
    """Every unit in deploy/, a template as its instance 1 (a bare template cannot be verified)."""
    units = [path.name.replace("@.", "@1.") for path in unit_files()]
    expected = {"construct.service", "construct-worker@1.service", "construct.socket", "construct-tcp.socket"}
    assert expected <= set(units), f"missing from deploy/: {expected - set(units)}"
    return units


def test_units_pass_systemd_analyze_verify(tmp_path):
    """Every unit in deploy/ passes `systemd-analyze verify` without a single warning."""
    directory = stage(tmp_path, with_dropins=False)
    problems = {unit: verify(directory, unit) for unit in units_to_verify()}
    assert {unit: lines for unit, lines in problems.items() if lines} == {}


def test_socket_activation_dropin_passes_systemd_analyze_verify(tmp_path):
    """With the socket-activation drop-in in place, every unit still verifies without a warning."""
    assert dropin_files(), "deploy/construct.service.d/*.conf is missing"
    directory = stage(tmp_path, with_dropins=True)
    problems = {unit: verify(directory, unit) for unit in units_to_verify()}
    assert {unit: lines for unit, lines in problems.items() if lines} == {}


def test_socket_names_match_the_systemd_endpoints():
    """Each socket unit names its descriptor, and the drop-in adopts exactly those names as INET6."""
    names = {}
    for path in DEPLOY.glob("*.socket"):
        text = path.read_text()
        (name,) = re.findall(r"^FileDescriptorName=(.+)$", text, re.M)
        listens = re.findall(r"^ListenStream=(.+)$", text, re.M)
        # One name per unit: FileDescriptorName= applies to every socket of its unit.
        assert len(listens) == 1, f"{path.name}: one ListenStream= per socket unit"
        # A bare port or [::] address is an AF_INET6 socket.
        assert re.fullmatch(r"\d+|\[[0-9a-fA-F:]*\]:\d+", listens[0]), f"{path.name}: not an INET6 address"
        names[name] = path.name
    ((_, argv),) = [(f, c) for f, cs in exec_starts(dropin_files()).items() for c in cs]
    endpoints = {argv[i]: argv[i + 1] for i in range(len(argv) - 1)}
    assert endpoints["--listen"] == "systemd:domain=INET6:name=construct-http"
    assert endpoints["--tcp"] == "systemd:domain=INET6:name=construct-tcp"
    assert set(names) == {"construct-http", "construct-tcp"}
    dropin = dropin_files()[0].read_text()
    for socket_unit in names.values():
        assert re.search(rf"^Requires=.*\b{re.escape(socket_unit)}\b", dropin, re.M), socket_unit


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.bind(("::", 0))
        return probe.getsockname()[1]


def test_socket_activation_hands_both_sockets_to_construct(tmp_path):
    """The drop-in's command adopts the sockets of both socket units by name, for IPv4 and IPv6 clients."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.fail("systemd-socket-activate is not installed: install Debian's systemd package", pytrace=False)
    ((_, argv),) = [(f, c) for f, cs in exec_starts(dropin_files()).items() for c in cs]
    ports, names, listen = {}, [], []
    for path in sorted(DEPLOY.glob("*.socket")):
        (name,) = re.findall(r"^FileDescriptorName=(.+)$", path.read_text(), re.M)
        ports[name] = free_port()
        names.append(name)
        # The same [::] (dual-stack, AF_INET6) address as the unit, on a free port.
        listen += ["-l", f"[::]:{ports[name]}"]
    env = process_env(CONSTRUCT_DATA_DIR=str(tmp_path / "data"), CONSTRUCT_HEALTH="tcp:0:interface=127.0.0.1")
    # systemd-socket-activate passes on only the variables it is given.
    passed = [f"-E{k}={v}" for k, v in env.items() if k.startswith("CONSTRUCT_") or k in ("PYTHONPATH", "PATH")]
    command = [activate, *listen, f"--fdname={':'.join(names)}", *passed, *TWISTD, *argv[1:]]
    log_path = tmp_path / "activated.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while log_path.read_text().count("Listening on") < len(names):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        # The first connection starts the service; it waits in the backlog meanwhile.
        for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(20)
                client.connect((host, ports["construct-http"]))
                client.sendall(b"GET /v1/openapi.json HTTP/1.0\r\n\r\n")
                assert client.recv(64).startswith(b"HTTP/1.0 200"), log_path.read_text()
        with socket.create_connection(("127.0.0.1", ports["construct-tcp"]), timeout=20) as client:
            client.sendall(b'{"type":"ping"}\n')
            assert b"pong" in client.recv(256), log_path.read_text()
    finally:
        # systemd-socket-activate execs the service, so this is twistd itself.
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait(5)
    log = log_path.read_text()
    # Adopted as INET6 sockets (a family mismatch would garble peer addresses).
    assert f"http listening on :::{ports['construct-http']}" in log, log
    assert f"tcp listening on :::{ports['construct-tcp']}" in log, log
    assert returncode in (0, -signal.SIGTERM), log
    assert "Traceback" not in log, log


def test_units_keep_the_hardening():
    """Both services keep the sandboxing and never set MemoryDenyWriteExecute (cffi needs W+X)."""
    required = ["ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
                "NoNewPrivileges=yes", "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                "RestrictNamespaces=yes", "LockPersonality=yes", "ProtectKernelTunables=yes",
                "ProtectKernelModules=yes", "ProtectControlGroups=yes", "RestrictSUIDSGID=yes",
                "SystemCallArchitectures=native", "SystemCallFilter=@system-service", "LimitNOFILE=65536",
                "TimeoutStopSec=30", "KillSignal=SIGTERM", "EnvironmentFile=/etc/construct/construct.env"]
    for name in ["construct.service", "construct-worker@.service"]:
        lines = (DEPLOY / name).read_text().splitlines()
        missing = [setting for setting in required if setting not in lines]
        assert missing == [], f"{name} lacks {missing}"
        assert not any(line.startswith("MemoryDenyWriteExecute=") for line in lines), name


# ---------------------------------------------------------------------------------------------
# (b) construct.tac


class TacProcess(ServerProcess):
    def command(self) -> list[str]:
        return TWISTD + [*GLOBAL_FLAGS, "-y", str(REPO / "construct.tac")]


def test_tac_runs_from_the_environment_and_stops_cleanly(tmp_path):
    """`twistd -ny construct.tac` listens as configured by CONSTRUCT_* alone and exits cleanly on SIGTERM."""
    data = tmp_path / "data"
    # The repository is left off PYTHONPATH: the tac itself must make this tree importable.
    outer = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    server = TacProcess(tmp_path, plugin="tac", expect=("http", "tcp", "health"), env={
        "PYTHONPATH": os.pathsep.join(outer),
        "CONSTRUCT_LISTEN": "tcp:0:interface=127.0.0.1",
        "CONSTRUCT_TCP": "tcp:0:interface=127.0.0.1",
        "CONSTRUCT_HEALTH": "tcp:0:interface=127.0.0.1",
        "CONSTRUCT_DATA_DIR": str(data),
    })
    try:
        server.start()
        assert "http listening on 127.0.0.1:" in server.log_text()
        assert (data / "construct.sqlite3").exists()
    finally:
        returncode = server.stop()
    log = server.log_text()
    # twistd re-raises SIGTERM after a clean shutdown, which systemd counts as a clean stop.
    assert returncode in (0, -signal.SIGTERM), log
    assert "Main loop terminated." in log, log
    assert "Traceback" not in log and "Unhandled" not in log, log


# ---------------------------------------------------------------------------------------------
# (c) consistency between units, environment file, Dockerfile and compose file


def test_every_construct_variable_used_is_defined():
    """Every CONSTRUCT_* name in deploy/, the Docker files, the tac and the docs is a real setting (or its _FILE)."""
    allowed = allowed_variables()
    unknown = {}
    for name, text in deployment_texts().items():
        for variable in set(VARIABLE.findall(text)):
            base = variable[: -len("_FILE")] if variable.endswith("_FILE") else variable
            if base not in allowed:
                unknown.setdefault(name, []).append(variable)
    assert unknown == {}


def test_env_example_documents_every_setting():
    """construct.env.example has a commented line for every setting of both programs."""
    text = (DEPLOY / "construct.env.example").read_text()
    lines = text.splitlines()
    missing = []
    for variable in sorted(allowed_variables()):
        index = next((i for i, line in enumerate(lines) if re.match(rf"#?{variable}(_FILE)?=", line)), None)
        if index is None:
            missing.append(variable)
        else:
            assert index > 0 and lines[index - 1].startswith("#"), f"{variable} has no comment above it"
    assert missing == []


def test_compose_environment_matches_the_env_example():
    """The compose file sets only variables that construct.env.example documents."""
    documented = set(VARIABLE.findall((DEPLOY / "construct.env.example").read_text()))
    used = set()
    for service in compose()["services"].values():
        used |= {name for name in service.get("environment", {}) if name.startswith("CONSTRUCT_")}
    assert used, "no CONSTRUCT_* variables in docker-compose.yml"
    assert used - documented == set()
    dockerfile = set(VARIABLE.findall((REPO / "Dockerfile").read_text()))
    assert dockerfile - documented == set()


def test_commands_are_the_same_everywhere():
    """Units, Dockerfile and compose run `twistd --nodaemon --pidfile= <plugin>` with real plugins and options."""
    makers = plugins()
    unit_commands = exec_starts(unit_files())
    plain_options: dict[str, set] = {}
    seen_in_units, seen_in_compose = set(), set()
    for origin, argv, is_unit in (
        [(f, c, True) for f, cs in unit_commands.items() for c in cs]
        + [(f, c, True) for f, cs in exec_starts(dropin_files()).items() for c in cs]
        + [(f"compose service {s}", c, False) for s, c in compose_commands().items()]
        + [("Dockerfile CMD", dockerfile_cmd(), False)]
    ):
        expected = VENV_TWISTD if is_unit else "twistd"
        assert argv[0] == expected, f"{origin}: runs {argv[0]}, not {expected}"
        flags, subcommand, arguments = split_twistd(argv)
        assert flags == GLOBAL_FLAGS, f"{origin}: twistd flags {flags}"
        assert subcommand in makers, f"{origin}: twistd has no plugin {subcommand!r}"
        names = option_names(arguments, makers[subcommand])
        assert not SECRET_OPTIONS & set(names), f"{origin}: a secret on the command line"
        if is_unit:
            seen_in_units.add(subcommand)
            if origin in unit_commands:
                plain_options.setdefault(subcommand, set()).update(names)
        elif origin.startswith("compose"):
            seen_in_compose.add(subcommand)
            # The compose file passes the same options on the command line as the plain units.
            assert set(names) == plain_options.get(subcommand, set()), f"{origin}: options {names}"
    assert seen_in_units == seen_in_compose == {"construct", "construct-worker"}
    assert dockerfile_cmd() == ["twistd", *GLOBAL_FLAGS, "construct"]
    assert unit_commands["construct.service"] == [[VENV_TWISTD, *GLOBAL_FLAGS, "construct"]]


def test_compose_health_checks_use_the_health_endpoint():
    """Every construct and worker service in the compose file is health-checked through /health on its port."""
    services = compose()["services"]
    for name, command in compose_commands().items():
        check = " ".join(services[name]["healthcheck"]["test"])
        port = "3001" if "construct-worker" in command else "3000"
        assert f"http://127.0.0.1:{port}/health" in check, name
        if "construct-worker" in command:
            assert f"tcp:{port}:" in " ".join(command), name
