"""The hub's web side: Klein app with the admin pages, the REST API, /health and /metrics."""
