"""`construct-bench`: load generator, bare-relay ceiling and reports (see docs/performance.md)."""
