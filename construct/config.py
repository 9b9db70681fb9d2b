"""Command-line options that can also come from the environment or from files.

Every option `--some-name` may instead be given as CONSTRUCT_SOME_NAME, or read from the file
named by CONSTRUCT_SOME_NAME_FILE (for secrets such as a database URL with a password).
The command line wins over the environment, the environment over the default. A bad value
ends the program with one line naming the option, never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.python import usage


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    # Secrets come only from the environment or a file: a command line is visible in `ps`.
    secret: bool = False
    # The environment variable, when CONSTRUCT_<NAME> would mean something else to another program.
    env: str | None = None
    # An on/off switch: `--name` takes no value; the environment says true or false (see `boolean`).
    flag: bool = False

    @property
    def variable(self) -> str:
        return self.env or env_name(self.name)


def env_name(option: str) -> str:
    return "CONSTRUCT_" + option.upper().replace("-", "_")


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be an integer, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, not {value}")
        return value

    return parse


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, not {text!r}")


def non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


class SettingsOptions(usage.Options):
    """usage.Options whose parameters are `settings`, resolved in postOptions."""

    settings: tuple[Setting, ...] = ()
    program = "construct"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # usage.Options reads optParameters from the class, not the instance.
        cls.optParameters = [
            [s.name, None, None, f"{s.help} [env {s.variable}; default: {s.default}]"]
            for s in cls.settings
            if not s.secret and not s.flag
        ]
        flags = [[s.name, None, f"{s.help} [env {s.variable}=true]"] for s in cls.settings if s.flag and not s.secret]
        if flags:
            cls.optFlags = list(cls.__dict__.get("optFlags", [])) + flags

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        for setting in self.settings:
            self[setting.name] = self._resolve(setting)

    def _resolve(self, setting: Setting) -> Any:
        raw, source = self.get(setting.name), f"--{setting.name}"
        if setting.flag:
            # usage.Options sets an absent flag to 0: only a given flag overrides the environment.
            raw = "true" if raw else None
        variable = setting.variable
        if raw is None and variable in self._environ:
            raw, source = self._environ[variable], variable
        if raw is None and variable + "_FILE" in self._environ:
            path = self._environ[variable + "_FILE"]
            try:
                with open(path, encoding="utf-8") as f:
                    raw, source = f.read().strip(), f"{variable}_FILE ({path})"
            except OSError as e:
                raise SystemExit(f"{self.program}: {variable}_FILE: cannot read {path}: {e.strerror}") from None
        if raw is None:
            return setting.default
        try:
            return setting.parse(raw)
        except ValueError as e:
            raise SystemExit(f"{self.program}: {source} {e}") from None
