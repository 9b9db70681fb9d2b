"""The wire protocol: codec, the operation table, and the WebSocket and TCP adapters."""
