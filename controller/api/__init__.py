"""HTTP routes: Shoal's own API under /v1, the seeds' routes, the OpenAPI document, the error middleware."""
