"""twistd plugins for Construct: declarations only, so plugin scans stay cheap."""

from twisted.application.service import ServiceMaker

construct = ServiceMaker(
    "Construct",
    "construct.tap",
    "End-to-end-encrypted messaging relay (WebSocket, TCP and HTTP).",
    "construct",
)
