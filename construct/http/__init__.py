"""HTTP: the /v1 API, the site that also upgrades WebSockets, and health and metrics."""
