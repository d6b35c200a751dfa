"""Media types of the manifests and blobs the fixtures use."""

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"  # withdrawn before OCI 1.1
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_NONDISTRIBUTABLE_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"

INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
IMAGE_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
SCHEMA1_TYPES = (SCHEMA1_SIGNED, SCHEMA1)
MANIFEST_TYPES = (*IMAGE_TYPES, *INDEX_TYPES, *SCHEMA1_TYPES)
FOREIGN_LAYER_TYPES = (DOCKER_FOREIGN_LAYER, OCI_NONDISTRIBUTABLE_LAYER)
# Without the OCI types an OCI manifest answers 404, and a schema2 manifest fetched by tag
# without its type is rewritten to schema1: always ask for all of them.
ACCEPT_ALL = ", ".join(MANIFEST_TYPES)
