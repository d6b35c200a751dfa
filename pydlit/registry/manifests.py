"""Manifest media types and what a manifest refers to (child manifests, config, layers)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# Withdrawn before OCI 1.1 was released, but ORAS, ACR and zot wrote it for a while.
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"

INDEX_TYPES = frozenset({DOCKER_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
# Without the OCI types an OCI manifest answers 404, and without schema2 a tag is rewritten to
# schema1: ask for every type we copy.
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, OCI_ARTIFACT])
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Layers the publisher may not allow registries to hold; with `urls` they are fetched from there.
NONDISTRIBUTABLE = frozenset({
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")


def image_ref(repo: str, ref: str) -> str:
    """repo:tag, or repo@digest."""
    return f"{repo}@{ref}" if DIGEST.fullmatch(ref) else f"{repo}:{ref}"


class ManifestError(ValueError):
    """A manifest pydlit cannot copy, with the reason in words."""


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str = ""
    urls: tuple[str, ...] = ()

    @property
    def foreign(self) -> bool:
        # Not uploaded, as the image spec asks of non-distributable layers: they live at their URLs.
        # Without URLs there is nowhere else to fetch one from, so it is copied like any layer.
        return bool(self.urls) and self.media_type in NONDISTRIBUTABLE

    @property
    def maybe_elsewhere(self) -> bool:
        """A layer whose URLs the source may serve it from instead of holding it."""
        return bool(self.urls) and not self.foreign


@dataclass(frozen=True)
class Manifest:
    media_type: str
    data: bytes
    digest: str
    children: tuple[str, ...] = ()
    blobs: tuple[Blob, ...] = ()
    subject: str | None = None  # the manifest this one refers to (OCI 1.1), when it names one


@dataclass
class Tree:
    """A whole image: the top manifest, its children by digest, and every blob once."""

    top: Manifest
    children: list[Manifest] = field(default_factory=list)

    @property
    def blobs(self) -> list[Blob]:
        seen: dict[str, Blob] = {}
        for m in [self.top, *self.children]:
            for b in m.blobs:
                if not b.foreign:
                    seen.setdefault(b.digest, b)
        return list(seen.values())


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_matches(digest: str, data: bytes) -> bool:
    """Checked here for the algorithms hashlib has; any other the registry checks as it commits."""
    algo, _, hexdigest = digest.partition(":")
    if algo not in ("sha256", "sha384", "sha512"):
        return True
    return hashlib.new(algo, data).hexdigest() == hexdigest


def parse_manifest(data: bytes, content_type: str) -> Manifest:
    """Read a manifest's references; `data` is kept as pulled so its digest never changes."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise ManifestError("the manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestError("the manifest is not a JSON object")
    media_type = _media_type(doc, content_type)
    if media_type in SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
        raise ManifestError(
            "it is a Docker schema1 manifest, which is deprecated and refused by current "
            "registries; rebuild or re-push the image as Docker schema2 or OCI"
        )
    digest = sha256_digest(data)
    subject = _subject(doc)
    if media_type in INDEX_TYPES:
        children = tuple(_descriptor(d, "manifests").digest for d in doc.get("manifests") or [])
        return Manifest(media_type, data, digest, children=children, subject=subject)
    if media_type in IMAGE_TYPES:
        blobs = [_descriptor(doc.get("config"), "config")]
        blobs += [_descriptor(d, "layers") for d in doc.get("layers") or []]
        return Manifest(media_type, data, digest, blobs=tuple(blobs), subject=subject)
    if media_type == OCI_ARTIFACT:
        blobs = [_descriptor(d, "blobs") for d in doc.get("blobs") or []]
        return Manifest(media_type, data, digest, blobs=tuple(blobs), subject=subject)
    keys = ", ".join(sorted(doc)[:8])
    raise ManifestError(f"unsupported manifest media type {media_type!r} (its keys: {keys})")


def index_descriptors(data: bytes) -> list[dict]:
    """The `manifests` of an image index, each checked as a descriptor and kept whole (its
    artifactType and annotations go into the indexes pydlit writes)."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise ManifestError("the index is not valid JSON") from None
    found = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(found, list):
        raise ManifestError("the index has no list of manifests")
    for d in found:
        _descriptor(d, "manifests")
    return found


def _media_type(doc: dict, content_type: str) -> str:
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    ct = content_type.split(";")[0].strip()
    # OCI allows omitting mediaType; Docker's schema2 types do not, so bytes without it are not
    # theirs whatever the registry says (a registry refuses them under a Docker type).
    if ct in (OCI_INDEX, OCI_MANIFEST, OCI_ARTIFACT) or ct in SCHEMA1_TYPES:
        return ct
    # Otherwise the shape tells.
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    if "blobs" in doc:
        return OCI_ARTIFACT
    return ct


def _subject(doc: dict) -> str | None:
    # Only what makes a manifest a referrer; a malformed subject makes it none, not uncopyable.
    try:
        return _descriptor(doc["subject"], "subject").digest if "subject" in doc else None
    except ManifestError:
        return None


def _descriptor(d: object, where: str) -> Blob:
    # Digests end up in request paths: anything but the spec's grammar could point elsewhere.
    if (
        not isinstance(d, dict)
        or not isinstance(d.get("digest"), str)
        or not DIGEST.fullmatch(d["digest"])
        or type(d.get("size")) is not int
        or d["size"] < 0
    ):
        raise ManifestError(f"the manifest has a malformed descriptor in {where}")
    return Blob(d["digest"], d["size"], str(d.get("mediaType") or ""), tuple(d.get("urls") or ()))
