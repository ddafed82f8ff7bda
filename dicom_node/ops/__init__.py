"""The node's HTTP side: health and readiness, Prometheus metrics, the admin view (see docs/operations.md)."""
