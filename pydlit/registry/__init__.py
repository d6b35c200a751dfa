"""A Registry HTTP API V2 / OCI distribution client: requests, auth, retries, manifests."""
