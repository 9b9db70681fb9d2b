"""The request every Construct site answers with: it never names twisted.web."""

from __future__ import annotations

from twisted.web.server import Request


class NamelessRequest(Request):
    """twisted.web puts `Server: TwistedWeb/<version>` on every response, telling scanners
    which software and version to try; `server_name` stands in for it (None: no header)."""

    server_name: bytes | None = None

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        if (name.lower() if isinstance(name, bytes) else name.lower().encode()) == b"server":
            if self.server_name is None:
                return
            value = self.server_name
        super().setHeader(name, value)
