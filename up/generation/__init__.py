"""Making images: the KV-cache sampler and the per-token and per-image uncertainty scores it records."""
