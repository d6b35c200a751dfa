"""Fixture images: build and push them through the registry API, read them back, compare.

Layer bytes are opaque (not gzip) and deterministic: an AES-CTR keystream keyed by the layer's
key, so a layer of any size is produced chunk by chunk and never sits whole in memory. Every
byte depends on its offset, so a resume at a wrong offset always changes the digest.

Manifests are serialised with indent=3 on purpose: a copier that re-serialises JSON changes
their digests and fails `assert_same_tree`.

Images with the same seed share layers (and digests); use distinct seeds where a test counts
bytes across images that should have nothing in common.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import mediatypes as mt
from .jose import schema1_canonical, sign_schema1
from .regclient import Endpoint, RegistryError, RegistryHTTP

GEN_CHUNK = 1 << 20
BIG_LAYER = 32 << 20  # above this, upload with chunked PATCH
PATCH_SIZE = 16 << 20
DEFAULT_LAYER_SIZES = (2_048, 70_001, 300_007)
CREATED = "2024-01-01T00:00:00Z"
FOREIGN_URL = "http://127.0.0.1:9/never"
KINDS = ("schema2", "oci", "docker_list", "oci_index", "foreign", "schema1")
PLATFORMS: tuple[tuple[str, str, str | None], ...] = (
    ("linux", "amd64", None),
    ("linux", "arm64", "v8"),
    ("linux", "arm", "v7"),
    ("linux", "ppc64le", None),
    ("linux", "s390x", None),
    ("linux", "386", None),
    ("linux", "riscv64", None),
    ("windows", "amd64", None),
)

_digest_cache: dict[tuple[str, int], str] = {}


# -- layer content -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    key: str
    size: int

    def chunks(self, chunk_size: int = GEN_CHUNK) -> Iterator[bytes]:
        aes_key = hashlib.sha256(f"pydlit-fixture-layer/{self.key}".encode()).digest()
        stream = Cipher(algorithms.AES(aes_key), modes.CTR(bytes(16))).encryptor()
        left = self.size
        while left > 0:
            n = min(chunk_size, left)
            yield stream.update(bytes(n))
            left -= n

    def data(self) -> bytes:
        return b"".join(self.chunks())

    def digest(self) -> str:
        cached = _digest_cache.get((self.key, self.size))
        if cached is None:
            hasher = hashlib.sha256()
            for chunk in self.chunks():
                hasher.update(chunk)
            cached = _digest_cache[(self.key, self.size)] = "sha256:" + hasher.hexdigest()
        return cached


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _serialise(obj: object) -> bytes:
    return json.dumps(obj, indent=3).encode() + b"\n"


# -- results -----------------------------------------------------------------------------------


@dataclass
class Image:
    repo: str
    tag: str
    digest: str  # of the top manifest (schema1: of its canonical payload)
    media_type: str
    manifest_bytes: bytes
    manifests: dict[str, tuple[str, bytes]]  # every manifest in the tree: digest -> (type, bytes)
    blobs: dict[str, int]  # every pushed blob incl. configs, excluding foreign layers
    foreign: dict[str, int] = field(default_factory=dict)  # referenced, never pushed

    @property
    def total_bytes(self) -> int:
        return sum(self.blobs.values())

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.tag}"


@dataclass
class Tree:
    repo: str
    ref: str
    digest: str
    media_type: str
    manifests: dict[str, bytes] = field(default_factory=dict)
    media_types: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)
    foreign: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.blobs.values())


# -- pushing -----------------------------------------------------------------------------------


def _ensure_blob(client: RegistryHTTP, repo: str, layer: LayerSpec) -> tuple[str, int]:
    """Upload a layer unless the repository already has it. Returns (digest, size)."""
    known = _digest_cache.get((layer.key, layer.size))
    if known is not None and client.blob_size(repo, known) is not None:
        return known, layer.size
    if layer.size > BIG_LAYER:
        digest, _ = client.upload_chunked(repo, layer.chunks(PATCH_SIZE))
        _digest_cache[(layer.key, layer.size)] = digest
        return digest, layer.size
    data = layer.data()
    digest = sha256_digest(data)
    _digest_cache[(layer.key, layer.size)] = digest
    if known is None and client.blob_size(repo, digest) is not None:
        return digest, layer.size
    client.upload_monolithic(repo, data, digest)
    return digest, layer.size


def _ensure_bytes(client: RegistryHTTP, repo: str, data: bytes) -> tuple[str, int]:
    digest = sha256_digest(data)
    if client.blob_size(repo, digest) is None:
        client.upload_monolithic(repo, data, digest)
    return digest, len(data)


def _platform_json(platform: tuple[str, str, str | None]) -> dict[str, str]:
    os_name, arch, variant = platform
    out = {"architecture": arch, "os": os_name}
    if variant:
        out["variant"] = variant
    return out


def _config(
    platform: tuple[str, str, str | None], diff_ids: list[str], label: str
) -> bytes:
    config = {
        **_platform_json(platform),
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.pydlit.test": label},
        },
        "created": CREATED,
        "history": [{"created": CREATED, "created_by": f"/bin/sh -c #(nop) ADD layer{i}"}
                    for i in range(len(diff_ids))],
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(config, indent=2).encode()


@dataclass
class _Built:
    digest: str
    media_type: str
    data: bytes
    size: int
    platform: tuple[str, str, str | None]


def _push_image_manifest(
    client: RegistryHTTP,
    repo: str,
    oci: bool,
    layers: list[LayerSpec],
    platform: tuple[str, str, str | None],
    label: str,
    out: Image,
    foreign: LayerSpec | None = None,
) -> _Built:
    """Push layers and config, build the manifest, record it in `out` (it is not PUT here)."""
    layer_type = mt.OCI_LAYER if oci else mt.DOCKER_LAYER
    descriptors = []
    for layer in layers:
        digest, size = _ensure_blob(client, repo, layer)
        out.blobs[digest] = size
        descriptors.append({"mediaType": layer_type, "size": size, "digest": digest})
    if foreign is not None:
        digest = foreign.digest()
        out.foreign[digest] = foreign.size
        descriptors.append(
            {"mediaType": mt.DOCKER_FOREIGN_LAYER, "size": foreign.size, "digest": digest,
             "urls": [FOREIGN_URL]}
        )
    config_digest, config_size = _ensure_bytes(
        client, repo, _config(platform, [d["digest"] for d in descriptors], label)
    )
    out.blobs[config_digest] = config_size
    media_type = mt.OCI_MANIFEST if oci else mt.DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": mt.OCI_CONFIG if oci else mt.DOCKER_CONFIG,
            "size": config_size,
            "digest": config_digest,
        },
        "layers": descriptors,
    }
    if oci:
        manifest["annotations"] = {"org.opencontainers.image.created": CREATED}
    data = _serialise(manifest)
    digest = sha256_digest(data)
    out.manifests[digest] = (media_type, data)
    return _Built(digest, media_type, data, len(data), platform)


def _push_schema1(
    client: RegistryHTTP, repo: str, tag: str, layers: list[LayerSpec], out: Image
) -> _Built:
    digests = []
    for layer in layers:
        digest, size = _ensure_blob(client, repo, layer)
        out.blobs[digest] = size
        digests.append(digest)
    ids = [hashlib.sha256(f"{repo}/{d}".encode()).hexdigest() for d in digests]
    history = []
    for i, layer_id in enumerate(ids):
        v1: dict[str, object] = {"id": layer_id, "created": CREATED,
                                 "container_config": {"Cmd": [f"/bin/sh -c #(nop) ADD layer{i}"]}}
        if i:
            v1["parent"] = ids[i - 1]
        if i == len(ids) - 1:
            v1 |= {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]}}
        history.append({"v1Compatibility": json.dumps(v1, separators=(",", ":"))})
    payload = _serialise({
        "schemaVersion": 1,
        "name": repo,
        "tag": tag,
        "architecture": "amd64",
        # schema1 lists the top-most layer first.
        "fsLayers": [{"blobSum": d} for d in reversed(digests)],
        "history": list(reversed(history)),
    }).rstrip()
    signed = sign_schema1(payload)
    digest = sha256_digest(payload)
    out.manifests[digest] = (mt.SCHEMA1_SIGNED, signed)
    return _Built(digest, mt.SCHEMA1_SIGNED, signed, len(signed), PLATFORMS[0])


def _put(client: RegistryHTTP, repo: str, ref: str, built: _Built, hint: str = "") -> None:
    try:
        answered = client.put_manifest(repo, ref, built.media_type, built.data)
    except RegistryError as exc:
        raise RegistryError(exc.method, exc.url + hint, exc.status, exc.body) from exc
    if answered != built.digest:
        raise AssertionError(
            f"registry stored {built.media_type} as {answered}, expected {built.digest}"
        )


def _layer_specs(seed: int, sizes: list[int] | tuple[int, ...], scope: str) -> list[LayerSpec]:
    # Layer 0 is keyed by the seed alone, so it is shared by every platform of an index.
    return [LayerSpec(f"{seed}/layer0" if i == 0 else f"{seed}/{scope}/layer{i}", size)
            for i, size in enumerate(sizes)]


def push_image(
    reg: Endpoint,
    repo: str,
    tag: str,
    kind: str = "schema2",
    layer_sizes: list[int] | tuple[int, ...] = DEFAULT_LAYER_SIZES,
    seed: int = 0,
    platforms: int = 3,
) -> Image:
    """Push a fixture image of `kind` (see KINDS) and tag it. Index kinds get `platforms` children
    with distinct configs and layers, except layer 0 which all of them share."""
    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind!r}, expected one of {KINDS}")
    if not layer_sizes:
        raise ValueError("an image needs at least one layer")
    client = RegistryHTTP.for_endpoint(reg)
    image = Image(repo, tag, "", "", b"", {}, {})
    label = f"seed={seed}"
    layers = _layer_specs(seed, layer_sizes, "p0")
    if kind in ("schema2", "oci"):
        top = _push_image_manifest(client, repo, kind == "oci", layers, PLATFORMS[0], label, image)
        _put(client, repo, tag, top)
    elif kind == "foreign":
        top = _push_image_manifest(client, repo, False, layers, PLATFORMS[0], label, image,
                                   foreign=LayerSpec(f"{seed}/foreign", 4096))
        _put(client, repo, tag, top)
    elif kind == "schema1":
        top = _push_schema1(client, repo, tag, layers, image)
        _put(client, repo, tag, top, " (schema1 needs a registry started with schema1=True)")
    else:
        top = _push_index(client, repo, tag, kind == "oci_index", layer_sizes, seed, platforms,
                          label, image)
    image.digest, image.media_type, image.manifest_bytes = top.digest, top.media_type, top.data
    return image


def _push_index(
    client: RegistryHTTP, repo: str, tag: str, oci: bool,
    layer_sizes: list[int] | tuple[int, ...], seed: int, platforms: int, label: str, image: Image,
) -> _Built:
    if not 1 <= platforms <= len(PLATFORMS):
        raise ValueError(f"platforms must be within 1..{len(PLATFORMS)}")
    children = []
    for p in range(platforms):
        child = _push_image_manifest(client, repo, oci, _layer_specs(seed, layer_sizes, f"p{p}"),
                                     PLATFORMS[p], label, image)
        _put(client, repo, child.digest, child)
        children.append(child)
    media_type = mt.OCI_INDEX if oci else mt.DOCKER_LIST
    index = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {"mediaType": c.media_type, "size": c.size, "digest": c.digest,
             "platform": _platform_json(c.platform)}
            for c in children
        ],
    }
    data = _serialise(index)
    top = _Built(sha256_digest(data), media_type, data, len(data), PLATFORMS[0])
    image.manifests[top.digest] = (media_type, data)
    _put(client, repo, tag, top)
    return top


def shared_layer_images(
    reg: Endpoint,
    repo: str,
    tags: tuple[str, str] = ("v1", "v2"),
    kind: str = "schema2",
    layer_sizes: list[int] | tuple[int, ...] = DEFAULT_LAYER_SIZES,
    seed: int = 0,
    repo_b: str | None = None,
) -> tuple[Image, Image]:
    """Two single-platform images sharing every layer but the last (and not their configs).

    The second goes to `repo_b` when given, else to `repo` under the second tag.
    """
    if kind not in ("schema2", "oci"):
        raise ValueError("shared_layer_images supports kind schema2 or oci")
    if len(layer_sizes) < 2:
        raise ValueError("need at least two layers: shared ones plus one distinct")
    client = RegistryHTTP.for_endpoint(reg)
    shared = [LayerSpec(f"{seed}/shared/layer{i}", s) for i, s in enumerate(layer_sizes[:-1])]
    images = []
    for n, (target, tag) in enumerate(((repo, tags[0]), (repo_b or repo, tags[1]))):
        image = Image(target, tag, "", "", b"", {}, {})
        last = LayerSpec(f"{seed}/shared/distinct{n}", layer_sizes[-1])
        top = _push_image_manifest(client, target, kind == "oci", [*shared, last], PLATFORMS[0],
                                   f"seed={seed} image={n}", image)
        _put(client, target, tag, top)
        image.digest, image.media_type, image.manifest_bytes = top.digest, top.media_type, top.data
        images.append(image)
    return images[0], images[1]


# -- reading back ------------------------------------------------------------------------------


def _manifest_digest(media_type: str, data: bytes) -> str:
    if media_type in mt.SCHEMA1_TYPES and b'"signatures"' in data:
        return sha256_digest(schema1_canonical(data))
    return sha256_digest(data)


def read_back(reg: Endpoint, repo: str, ref: str, *, verify_blobs: bool = True) -> Tree:
    """Fetch the manifest tree behind repo:ref and check every digest on the way.

    With verify_blobs (default) each blob is streamed and its sha256 checked; without, HEAD only.
    """
    client = RegistryHTTP.for_endpoint(reg)
    media_type, data, header_digest = client.get_manifest(repo, ref)
    digest = _manifest_digest(media_type, data)
    if header_digest and header_digest != digest:
        raise AssertionError(f"{repo}:{ref}: Docker-Content-Digest {header_digest} != {digest}")
    tree = Tree(repo, ref, digest, media_type)
    _walk(client, tree, digest, media_type, data, verify_blobs)
    return tree


def _walk(
    client: RegistryHTTP, tree: Tree, digest: str, media_type: str, data: bytes, verify: bool
) -> None:
    tree.manifests[digest] = data
    tree.media_types[digest] = media_type
    doc = json.loads(data)
    if media_type in mt.INDEX_TYPES:
        for child in doc["manifests"]:
            child_type, child_data, _ = client.get_manifest(tree.repo, child["digest"])
            actual = _manifest_digest(child_type, child_data)
            if actual != child["digest"] or len(child_data) != child["size"]:
                raise AssertionError(f"child {child['digest']} reads back as {actual}")
            if child.get("mediaType", child_type) != child_type:
                raise AssertionError(
                    f"child {actual} is {child_type}, index says {child['mediaType']}"
                )
            _walk(client, tree, actual, child_type, child_data, verify)
        return
    if media_type in mt.SCHEMA1_TYPES:
        descriptors = [{"digest": layer["blobSum"]} for layer in doc["fsLayers"]]
    else:
        descriptors = [doc["config"], *doc["layers"]]
    for desc in descriptors:
        blob = desc["digest"]
        if desc.get("urls") and desc.get("mediaType") in mt.FOREIGN_LAYER_TYPES:
            tree.foreign[blob] = desc["size"]
            continue
        if blob in tree.blobs:
            continue
        if verify:
            size = client.read_blob(tree.repo, blob)
        else:
            found = client.blob_size(tree.repo, blob)
            if found is None:
                raise AssertionError(f"blob {blob} missing from {tree.repo}")
            size = found
        if "size" in desc and desc["size"] != size:
            raise AssertionError(f"blob {blob}: descriptor says {desc['size']} bytes, read {size}")
        tree.blobs[blob] = size


def _as_tree(x: Image | Tree) -> Tree:
    if isinstance(x, Tree):
        return x
    return Tree(
        x.repo, x.tag, x.digest, x.media_type,
        manifests={d: b for d, (_, b) in x.manifests.items()},
        media_types={d: t for d, (t, _) in x.manifests.items()},
        blobs=dict(x.blobs), foreign=dict(x.foreign),
    )


def assert_same_tree(src: Image | Tree, dst: Tree) -> None:
    """Byte-for-byte equality of the two manifest trees and their blob sets.

    schema1 is compared by canonical payload: the registry re-signs it on every GET.
    """
    a, b = _as_tree(src), _as_tree(dst)
    problems = []
    if (a.digest, a.media_type) != (b.digest, b.media_type):
        problems.append(f"top: {a.media_type} {a.digest} != {b.media_type} {b.digest}")
    if a.manifests.keys() != b.manifests.keys():
        problems.append(
            f"manifests only in source: {sorted(a.manifests.keys() - b.manifests.keys())}, "
            f"only in target: {sorted(b.manifests.keys() - a.manifests.keys())}"
        )
    for digest in a.manifests.keys() & b.manifests.keys():
        left, right = a.manifests[digest], b.manifests[digest]
        if a.media_types[digest] in mt.SCHEMA1_TYPES:
            left, right = schema1_canonical(left), schema1_canonical(right)
        if left != right or a.media_types[digest] != b.media_types[digest]:
            problems.append(f"manifest {digest} differs")
    if a.blobs != b.blobs:
        resized = [d for d in a.blobs.keys() & b.blobs.keys() if a.blobs[d] != b.blobs[d]]
        problems.append(
            f"blobs only in source: {sorted(a.blobs.keys() - b.blobs.keys())}, "
            f"only in target: {sorted(b.blobs.keys() - a.blobs.keys())}, sizes differ: {resized}"
        )
    if a.foreign != b.foreign:
        problems.append(f"foreign layers differ: {a.foreign} != {b.foreign}")
    if problems:
        raise AssertionError(f"{a.repo}:{a.ref} vs {b.repo}:{b.ref}:\n  " + "\n  ".join(problems))


def manifest_digest(reg: Endpoint, repo: str, ref: str) -> str | None:
    """Docker-Content-Digest of repo:ref via HEAD, None when it does not exist."""
    return RegistryHTTP.for_endpoint(reg).head_manifest(repo, ref)


def list_tags(reg: Endpoint, repo: str) -> list[str]:
    return RegistryHTTP.for_endpoint(reg).tags(repo)
