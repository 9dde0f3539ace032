"""The `/v1` endpoints, one module per group; each adds its routes to an app."""
