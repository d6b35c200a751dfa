"""OCI 1.1 referrers: the signatures, SBOMs and attestations whose `subject` is one of an image's
manifests. They are found at the source through the referrers API or, where a registry has no such
API (distribution 2.8 among them), through the tag schema's index under `<alg>-<hex>`. At a target
they are pushed after the image's manifests and before its tag, so that a tag is never seen
without its signatures; a target that does not index subjects itself gets the tag schema's index.
cosign's older digest tags (`<alg>-<hex>.sig`, `.att`, `.sbom`) go the same way, by name.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .registry.client import RegistryClient, RegistryError
from .registry.manifests import OCI_INDEX, Blob, Manifest, ManifestError, Tree, index_descriptors, parse_manifest
from .registry.trees import push_levels, read_tree

log = logging.getLogger(__name__)

T = TypeVar("T")

# A signature of an attestation of an image is two levels down; deeper chains are not followed.
MAX_DEPTH = 4
MAX_REFERRERS = 1000
MAX_TAGS = 100_000  # a repository's tags, listed to find the attachments among them
DIGEST_TAG_SUFFIXES = ("sig", "att", "sbom")


@dataclass
class Referrers:
    """The referrers of one manifest."""

    subject: str
    descriptors: list[dict[str, Any]]  # every referrer the source lists, as it lists them
    # The source's tag-schema index as pulled, to be copied as is; None when the API listed them
    # or the index names referrers that are not copied.
    listing: Manifest | None
    trees: list[Tree]  # the referrers not otherwise in the copy, each with the manifests below it

    @property
    def blobs(self) -> list[Blob]:
        return [b for t in self.trees for b in t.blobs]


def fallback_tag(digest: str) -> str:
    """The tag schema's name for the referrers of `digest`: `<alg>-<encoded>`, cut to 32 and 64
    characters."""
    alg, _, encoded = digest.partition(":")
    return f"{alg[:32]}-{encoded[:64]}"


async def tag_names(client: RegistryClient, repo: str) -> set[str] | None:
    """The repository's tags, which tell what the tag schema and cosign have attached without
    asking for each name; None where the registry will not list them (credentials that may pull
    but not list, too many tags): then each name is asked for."""
    try:
        return set(await client.list_tags(repo, MAX_TAGS))
    except RegistryError as exc:
        log.warning("%s: the tags of %s are not listed (%s); each attachment is asked for by name", client.name, repo, exc)
        return None


class _Lister:
    """Lists referrers at one registry: through its API until it answers that it has none."""

    def __init__(self, client: RegistryClient, repo: str, tags: set[str] | None) -> None:
        self.client = client
        self.repo = repo
        self.tags = tags
        self.api: bool | None = None

    async def referrers(self, subject: str) -> tuple[list[dict[str, Any]], Manifest | None]:
        if self.api is not False:
            listed = await self.client.list_referrers(self.repo, subject, MAX_REFERRERS)
            if listed is not None:
                self.api = True
                return listed, None
            self.api = False
        tag = fallback_tag(subject)
        if self.tags is not None and tag not in self.tags:
            return [], None
        index = await self.client.find_manifest(self.repo, tag)
        if index is None:
            return [], None
        if index.media_type != OCI_INDEX:
            log.warning("%s: %s:%s is a %s, not a referrers index; not read as one",
                        self.client.name, self.repo, tag, index.media_type)
            return [], None
        try:
            descriptors = index_descriptors(index.data)
        except ManifestError as exc:
            log.warning("%s: %s:%s is no readable referrers index (%s); not read as one", self.client.name, self.repo, tag, exc)
            return [], None
        # Listed twice is listed once: the index is anyone's to write.
        return list({d["digest"]: d for d in descriptors}.values()), index


async def find_referrers(
    client: RegistryClient, repo: str, tree: Tree, tags: set[str] | None, parallel: int = 8,
) -> list[Referrers]:
    """The referrers of every manifest of `tree`, and theirs in turn, in the order they can be
    pushed: each after its subject. A listed referrer the registry no longer serves is left out.
    `tags`: the repository's, if known (see tag_names)."""
    lister = _Lister(client, repo, tags)
    sem = asyncio.Semaphore(parallel)
    known = {m.digest for m in (tree.top, *tree.children)}
    subjects = list(dict.fromkeys([tree.top.digest, *(m.digest for m in tree.children)]))
    found: list[Referrers] = []
    count = 0

    async def listed(subject: str) -> tuple[list[dict[str, Any]], Manifest | None]:
        async with sem:
            return await lister.referrers(subject)

    async def read(digest: str) -> Tree | None:
        async with sem:
            try:
                return await read_tree(client, repo, digest, parallel=1)
            except RegistryError as exc:
                if exc.status != 404:
                    raise
        log.warning("%s: referrer %s is listed but not served; it is not copied", client.name, digest)
        return None

    # The first listing alone: it tells whether the registry has the API, for all the others.
    listings = [await listed(subjects[0])] + await _all(listed(s) for s in subjects[1:])
    for depth in range(MAX_DEPTH + 1):
        if not subjects:
            break
        if depth == MAX_DEPTH:
            if any(descriptors for descriptors, _ in listings):
                log.warning("%s: referrers more than %d levels below %s@%s are not copied",
                            client.name, MAX_DEPTH, repo, tree.top.digest)
            break
        level = []
        for subject, (descriptors, listing) in zip(subjects, listings, strict=True):
            new = [d["digest"] for d in descriptors if d["digest"] not in known]
            known.update(new)
            count += len(new)
            if count > MAX_REFERRERS:
                raise RegistryError(client.name, f"list referrers of {repo}",
                                    f"the image has more than {MAX_REFERRERS} referrers; copy it without them")
            if descriptors:
                level.append((Referrers(subject, descriptors, listing, []), new))
        trees = iter(await _all(read(d) for _, new in level for d in new))
        subjects = []
        for refs, new in level:
            read_now = [next(trees) for _ in new]
            refs.trees = [t for t in read_now if t is not None and _refers_to(t, refs.subject, client.name)]
            dropped = set(new) - {t.top.digest for t in refs.trees}
            if dropped:
                refs.descriptors = [d for d in refs.descriptors if d["digest"] not in dropped]
                refs.listing = None  # no longer what the target should list
            below = [m.digest for t in refs.trees for m in (t.top, *t.children)]
            known.update(below)
            subjects += below
            if refs.descriptors:
                found.append(refs)
        listings = await _all(listed(s) for s in subjects)
    return found


def _refers_to(tree: Tree, subject: str, registry: str) -> bool:
    if tree.top.subject == subject:
        return True
    log.warning("%s: %s is listed as a referrer of %s but names %s as its subject; it is not copied",
                registry, tree.top.digest, subject, tree.top.subject or "no subject")
    return False


@dataclass
class DigestTag:
    """A tag named after a manifest's digest, `<alg>-<hex>.<suffix>`: how cosign before OCI 1.1
    attaches signatures (.sig), attestations (.att) and SBOMs (.sbom), by name, not by subject."""

    tag: str
    tree: Tree


async def find_digest_tags(
    client: RegistryClient, repo: str, digests: Iterable[str], tags: set[str] | None, parallel: int = 8,
) -> list[DigestTag]:
    """The digest tags of the given manifests, each with what it holds. `tags`: the repository's,
    if known; else every name is asked for."""
    names = [f"{fallback_tag(d)}.{suffix}" for d in dict.fromkeys(digests) for suffix in DIGEST_TAG_SUFFIXES]
    if tags is not None:
        names = [n for n in names if n in tags]
    sem = asyncio.Semaphore(parallel)

    async def read(tag: str) -> DigestTag | None:
        async with sem:
            try:
                return DigestTag(tag, await read_tree(client, repo, tag, parallel=1))
            except RegistryError as exc:
                if exc.status != 404:
                    raise
        return None  # not there, or untagged since it was listed

    return [dt for dt in await _all(read(n) for n in names) if dt is not None]


class ReferrerPusher:
    """Pushes referrers to one target repository, learning from the first whether the registry
    indexes subjects itself (it answers OCI-Subject) or needs the tag schema's index."""

    def __init__(self, client: RegistryClient, repo: str, held: set[str]) -> None:
        self.client = client
        self.repo = repo
        self.held = held  # digests the target is known to hold already (the copy's own set)
        self.api: bool | None = None

    async def push(self, found: list[Referrers]) -> None:
        for refs in found:
            for tree in refs.trees:
                if tree.top.digest in self.held:
                    continue
                try:
                    await self._put_below(tree)
                    indexed = await self.client.put_manifest(self.repo, tree.top.digest, tree.top)
                except RegistryError as exc:
                    exc.step += f" (a referrer of {refs.subject}; copy without referrers to leave them behind)"
                    raise
                if self.api is None:
                    self.api = indexed == refs.subject
            if self.api is None:
                # Nothing pushed here to tell: the registry's referrers API says.
                self.api = await self.client.list_referrers(self.repo, refs.subject, MAX_REFERRERS) is not None
            if not self.api:
                await self._list_under_tag(refs)

    async def push_tags(self, tags: list[DigestTag], overwrite: bool) -> None:
        """Each digest tag as at the source. cosign adds a signature to a .sig tag by replacing
        it with one more layer: a target's tag whose layers the source's all hold is an older
        copy and is replaced; one with layers of its own is kept, unless `overwrite`."""
        for dt in tags:
            top = dt.tree.top
            current = await self.client.find_manifest(self.repo, dt.tag)
            if current is not None and current.digest == top.digest:
                continue
            if current is not None and not overwrite and not _within(current, top):
                log.warning("%s: %s:%s holds %s, with layers the source's %s lacks; kept, as overwrite is false",
                            self.client.name, self.repo, dt.tag, current.digest, top.digest)
                continue
            await self._put_below(dt.tree)
            await self.client.put_manifest(self.repo, dt.tag, top)

    async def list_itself(self, referrer: Manifest, pushed: bool) -> None:
        """A manifest with a subject, `pushed` to a registry that did not index it (no OCI-Subject
        answer): listed in its subject's tag-schema index, as the OCI spec asks of a client. One
        the tag already held may have been pushed by a run that ended before it listed it: there
        the registry's referrers API, if it has one, stands for the index."""
        subject = referrer.subject
        assert subject is not None
        try:
            if not pushed and await self.client.list_referrers(self.repo, subject, MAX_REFERRERS) is not None:
                return
            await self._list_under_tag(Referrers(subject, [referrer_descriptor(referrer)], None, []))
        except RegistryError as exc:  # the copy itself is whole: this is worth a word, not a failure
            log.warning("%s: %s copied to %s, but not listed among the referrers of %s: %s",
                        self.client.name, referrer.digest, self.repo, referrer.subject, exc)

    async def _put_below(self, tree: Tree) -> None:
        for level in push_levels(tree):
            for m in level:
                if m.digest not in self.held:
                    await self.client.put_manifest(self.repo, m.digest, m)

    async def _list_under_tag(self, refs: Referrers) -> None:
        """Add what the target's tag-schema index lacks. The source's own index, byte for byte,
        where it lists all the target's; a merged one where the target has referrers of its own."""
        tag = fallback_tag(refs.subject)
        current = await self.client.find_manifest(self.repo, tag)
        listed = _listed_at_target(self.client.name, f"{self.repo}:{tag}", current)
        have = {d["digest"] for d in listed}
        missing = [d for d in refs.descriptors if d["digest"] not in have]
        if not missing:
            return
        if refs.listing is not None and have <= {d["digest"] for d in refs.descriptors}:
            index = refs.listing
        else:
            index = _index([*listed, *missing])
        await self.client.put_manifest(self.repo, tag, index)


def referrer_descriptor(m: Manifest) -> dict[str, Any]:
    """How a referrers listing names the manifest: its artifactType (an image's config type
    where it has none) and annotations with it."""
    doc = json.loads(m.data)
    found: dict[str, Any] = {"mediaType": m.media_type, "digest": m.digest, "size": len(m.data)}
    config = doc.get("config")
    artifact = doc.get("artifactType") or (config.get("mediaType") if isinstance(config, dict) else None)
    if isinstance(artifact, str) and artifact:
        found["artifactType"] = artifact
    if isinstance(doc.get("annotations"), dict) and doc["annotations"]:
        found["annotations"] = doc["annotations"]
    return found


def _listed_at_target(registry: str, where: str, current: Manifest | None) -> list[dict[str, Any]]:
    """What a target's tag-schema index lists; a tag holding anything else is not ours to replace."""
    if current is None:
        return []
    if current.media_type != OCI_INDEX:
        problem = f"the tag holds a {current.media_type}, not a referrers index"
    else:
        try:
            return index_descriptors(current.data)
        except ManifestError as exc:
            problem = f"the tag holds an index that cannot be read ({exc})"
    raise RegistryError(registry, f"list referrers under {where}",
                        f"{problem}, and was left alone; delete that tag at the target, or copy without referrers")


def _within(older: Manifest, newer: Manifest) -> bool:
    """Everything `older` holds beside its config (layers, or an index's manifests), `newer` holds."""

    def held(m: Manifest) -> set[str]:
        return {*m.children, *(b.digest for b in m.blobs[1:])}

    return held(older) <= held(newer)


async def _all(aws: Iterable[Awaitable[T]]) -> list[T]:
    """gather, but a failure cancels the others: no request goes on for a copy that has failed."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _index(descriptors: list[dict[str, Any]]) -> Manifest:
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}, separators=(",", ":")).encode()
    return parse_manifest(data, OCI_INDEX)
