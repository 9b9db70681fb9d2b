"""twistd plugins for Construct: declarations only, so plugin scans stay cheap."""

from twisted.application.service import ServiceMaker

construct = ServiceMaker(
    "Construct",
    "construct.tap",
    "End-to-end-encrypted messaging relay (WebSocket, TCP and HTTP).",
    "construct",
)

construct_worker = ServiceMaker(
    "Construct worker",
    "construct.worker_tap",
    "Delivery worker for production mode (Redis): drains, redelivers and expires inboxes.",
    "construct-worker",
)
