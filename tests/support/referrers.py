"""Fixture referrers (OCI 1.1 artifacts whose `subject` is another manifest), pushed the way cosign
and notation push them: the artifact by digest, then, on a registry without the referrers API,
the subject's tag-schema index under `sha256-<hex>`, extended with the new descriptor."""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import mediatypes as mt
from .images import sha256_digest
from .regclient import Endpoint, RegistryHTTP

EMPTY_CONFIG = b"{}"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"


@dataclass
class Referrer:
    digest: str
    data: bytes
    blobs: dict[str, int]  # digest -> size, the empty config included
    descriptor: dict

    @property
    def size(self) -> int:
        return len(self.data)


def fallback_tag(digest: str) -> str:
    alg, _, encoded = digest.partition(":")
    return f"{alg}-{encoded[:64]}"


def push_referrer(
    reg: Endpoint, repo: str, subject: tuple[str, str, int], artifact_type: str, payload: bytes,
    *, annotations: dict[str, str] | None = None, tag_index: bool = True,
) -> Referrer:
    """Push an artifact about `subject` = (digest, media type, size). With tag_index, add it to
    the subject's tag-schema index (what a client does where the registry has no referrers API)."""
    client = RegistryHTTP.for_endpoint(reg)
    blobs = {}
    for data in (EMPTY_CONFIG, payload):
        digest = sha256_digest(data)
        if client.blob_size(repo, digest) is None:
            client.upload_monolithic(repo, data, digest)
        blobs[digest] = len(data)
    doc: dict = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_TYPE, "digest": sha256_digest(EMPTY_CONFIG), "size": len(EMPTY_CONFIG)},
        "layers": [{"mediaType": artifact_type, "digest": sha256_digest(payload), "size": len(payload)}],
        "subject": {"mediaType": subject[1], "digest": subject[0], "size": subject[2]},
    }
    if annotations:
        doc["annotations"] = annotations
    # indent=3, as the fixture images: a copier that re-serialises changes the digest.
    data = json.dumps(doc, indent=3).encode()
    digest = client.put_manifest(repo, sha256_digest(data), mt.OCI_MANIFEST, data)
    descriptor = {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(data), "artifactType": artifact_type}
    if annotations:
        descriptor["annotations"] = annotations
    if tag_index:
        add_to_tag_index(reg, repo, subject[0], descriptor)
    return Referrer(digest, data, blobs, descriptor)


def add_to_tag_index(reg: Endpoint, repo: str, subject: str, descriptor: dict) -> bytes:
    """Append `descriptor` to the subject's tag-schema index (made if absent); its new bytes."""
    client = RegistryHTTP.for_endpoint(reg)
    tag = fallback_tag(subject)
    if client.head_manifest(repo, tag) is None:
        doc = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
    else:
        doc = json.loads(client.get_manifest(repo, tag)[1])
    doc["manifests"].append(descriptor)
    data = json.dumps(doc, indent=3).encode()
    client.put_manifest(repo, tag, mt.OCI_INDEX, data)
    return data


def tag_index(reg: Endpoint, repo: str, subject: str) -> bytes | None:
    """The subject's tag-schema index as stored, or None."""
    client = RegistryHTTP.for_endpoint(reg)
    if client.head_manifest(repo, fallback_tag(subject)) is None:
        return None
    return client.get_manifest(repo, fallback_tag(subject))[1]


def push_digest_tag(reg: Endpoint, repo: str, subject: str, suffix: str, *payloads: bytes) -> Referrer:
    """A cosign-style attachment (before OCI 1.1): a manifest tagged `sha256-<hex>.<suffix>`,
    with no subject, a layer per signature; cosign signs again by tagging it anew with one more."""
    client = RegistryHTTP.for_endpoint(reg)
    config = json.dumps({"architecture": "", "os": "", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    blobs = {}
    for data in (config, *payloads):
        digest = sha256_digest(data)
        if client.blob_size(repo, digest) is None:
            client.upload_monolithic(repo, data, digest)
        blobs[digest] = len(data)
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": sha256_digest(payload),
                    "size": len(payload), "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ=="}}
                   for payload in payloads],
    }
    data = json.dumps(doc, indent=3).encode()
    digest = client.put_manifest(repo, f"{fallback_tag(subject)}.{suffix}", mt.OCI_MANIFEST, data)
    return Referrer(digest, data, blobs, {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(data)})
