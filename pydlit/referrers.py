"""OCI 1.1 referrers: the signatures, SBOMs and attestations whose `subject` is one of an image's
manifests. They are found at the source through the referrers API or, where a registry has no such
API (distribution 2.8 among them), through the tag schema's index under `<alg>-<hex>`. At a target
they are pushed after the image's manifests and before its tag, so that a tag is never seen
without its signatures; a target that does not index subjects itself gets the tag schema's index.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from .registry.client import RegistryClient, RegistryError
from .registry.manifests import OCI_INDEX, Blob, Manifest, Tree, index_descriptors, parse_manifest
from .registry.trees import read_tree

log = logging.getLogger(__name__)

# A signature of an attestation of an image is two levels down; deeper chains are not followed.
MAX_DEPTH = 4
MAX_REFERRERS = 1000


@dataclass
class Referrers:
    """The referrers of one manifest."""

    subject: str
    descriptors: list[dict[str, Any]]  # every referrer the source lists, as it lists them
    listing: Manifest | None  # the source's tag-schema index as pulled; None when the API listed them
    trees: list[Tree]  # the referrers not otherwise in the copy, each with the manifests below it

    @property
    def blobs(self) -> list[Blob]:
        return [b for t in self.trees for b in t.blobs]


def fallback_tag(digest: str) -> str:
    """The tag schema's name for the referrers of `digest`."""
    return digest.replace(":", "-")[:128]


class _Lister:
    """Lists referrers at one registry: through its API until it answers that it has none."""

    def __init__(self, client: RegistryClient, repo: str) -> None:
        self.client = client
        self.repo = repo
        self.api: bool | None = None

    async def referrers(self, subject: str) -> tuple[list[dict[str, Any]], Manifest | None]:
        if self.api is not False:
            listed = await self.client.list_referrers(self.repo, subject)
            if listed is not None:
                self.api = True
                return listed, None
            self.api = False
        index = await self.client.find_manifest(self.repo, fallback_tag(subject))
        if index is None:
            return [], None
        if index.media_type != OCI_INDEX:
            log.warning("%s: %s:%s is a %s, not a referrers index; not read as one",
                        self.client.name, self.repo, fallback_tag(subject), index.media_type)
            return [], None
        return index_descriptors(index.data), index


async def find_referrers(client: RegistryClient, repo: str, tree: Tree, parallel: int = 8) -> list[Referrers]:
    """The referrers of every manifest of `tree`, and theirs in turn, in the order they can be
    pushed: each after its subject."""
    lister = _Lister(client, repo)
    sem = asyncio.Semaphore(parallel)
    known = {m.digest for m in (tree.top, *tree.children)}
    subjects = list(dict.fromkeys([tree.top.digest, *(m.digest for m in tree.children)]))
    found: list[Referrers] = []
    count = 0

    async def listed(subject: str) -> tuple[list[dict[str, Any]], Manifest | None]:
        async with sem:
            return await lister.referrers(subject)

    async def read(digest: str) -> Tree:
        async with sem:
            return await read_tree(client, repo, digest, parallel)

    for _ in range(MAX_DEPTH):
        if not subjects:
            break
        level = []
        for subject, (descriptors, listing) in zip(subjects, await asyncio.gather(*map(listed, subjects)), strict=True):
            if not descriptors:
                continue
            new = [d for d in dict.fromkeys(str(d["digest"]) for d in descriptors) if d not in known]
            known.update(new)
            count += len(new)
            if count > MAX_REFERRERS:
                raise RegistryError(client.name, f"list referrers of {repo}", f"the image has more than {MAX_REFERRERS} referrers")
            level.append((Referrers(subject, descriptors, listing, []), new))
        trees = iter(await asyncio.gather(*(read(d) for _, new in level for d in new)))
        subjects = []
        for refs, new in level:
            refs.trees = [next(trees) for _ in new]
            below = [m.digest for t in refs.trees for m in (t.top, *t.children)]
            known.update(below)
            subjects += below
            found.append(refs)
    return found


class ReferrerPusher:
    """Pushes referrers to one target repository, learning on the way whether the registry
    indexes subjects itself (it answers OCI-Subject) or needs the tag schema's index."""

    def __init__(self, client: RegistryClient, repo: str, present: set[str]) -> None:
        self.client = client
        self.repo = repo
        self.present = present  # manifests the target is known to hold already
        self.api: bool | None = None

    async def push(self, found: list[Referrers]) -> None:
        for refs in found:
            pushed = 0
            for tree in refs.trees:
                if tree.top.digest in self.present:
                    continue
                for m in reversed(tree.children):  # what an index names goes first
                    if m.digest not in self.present:
                        await self.client.put_manifest(self.repo, m.digest, m)
                indexed = await self.client.put_manifest(self.repo, tree.top.digest, tree.top)
                self.api = indexed == refs.subject
                pushed += 1
            if self.api is None:
                # Nothing pushed here yet to tell: the registry's referrers API says.
                self.api = await self.client.list_referrers(self.repo, refs.subject) is not None
            if not self.api:
                await self._list_under_tag(refs)

    async def _list_under_tag(self, refs: Referrers) -> None:
        """Add what the target's tag-schema index lacks. The source's own index, byte for byte,
        where it lists all the target's; a merged one where the target has referrers of its own."""
        tag = fallback_tag(refs.subject)
        current = await self.client.find_manifest(self.repo, tag)
        if current is not None and current.media_type != OCI_INDEX:
            raise RegistryError(self.client.name, f"list referrers under {self.repo}:{tag}",
                                f"the tag holds a {current.media_type}, not a referrers index; it was left alone")
        listed = index_descriptors(current.data) if current is not None else []
        have = {d["digest"] for d in listed}
        missing = [d for d in refs.descriptors if d["digest"] not in have]
        if not missing:
            return
        if refs.listing is not None and have <= {d["digest"] for d in refs.descriptors}:
            index = refs.listing
        else:
            index = _index([*listed, *missing])
        await self.client.put_manifest(self.repo, tag, index)


def _index(descriptors: list[dict[str, Any]]) -> Manifest:
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}, separators=(",", ":")).encode()
    return parse_manifest(data, OCI_INDEX)
