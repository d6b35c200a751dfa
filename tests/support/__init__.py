"""Test-support layer for pydlit: real registries, a token server, fixture images, a fault proxy
and a subprocess wrapper for the service. Everything listens on 127.0.0.1 only."""
