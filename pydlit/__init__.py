"""pydlit: distribute a container image from one registry to many, without a Docker daemon."""
