"""Writes in flight across a service's jobs: blob uploads by registry and digest, and manifest
pushes by registry repository.

Jobs that copy the same layers to one registry at once (one image to several repositories, as
separate jobs; images built on one base) would each send them. Instead the first to start leads
the upload, and the others wait for it and mount the blob from its repository. Only a job that
reads the same source registry follows: it would read the bytes at that pace itself. And only
one that may read the leader's repository (see may_link). A job with an upload session of that
blob to resume sends it all the same; later jobs follow the first.

Manifests are pushed to a repository by one target at a time (see pushing_manifests).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass


def may_link(account: str, repo: str, from_account: str, from_repo: str) -> bool:
    """Whether a target of a registry may take a blob from an upload to `from_repo` there rather
    than send it: into its own repository, or with the same credentials (another's may not read
    that repository, and would learn so only once its wait was over)."""
    return repo == from_repo or account == from_account


@dataclass
class Upload:
    """One blob being sent to one registry's repository by some job."""

    repo: str
    source: str  # the registry it is read from
    account: str  # whose credentials send it (RegistryClient.account)
    landed: asyncio.Future[bool]  # whether the blob is now in `repo`

    def followed_by(self, source: str, account: str, repo: str) -> bool:
        """Whether a target (of this registry) may wait for this upload rather than send."""
        return source == self.source and may_link(account, repo, self.account, self.repo)


class InFlight:
    def __init__(self) -> None:
        self._live: dict[tuple[str, str], Upload] = {}
        self._pushing: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def pushing_manifests(self, registry: str, repo: str) -> AsyncIterator[None]:
        """Hold the repository's manifest pushes to this one. Two targets putting the same
        manifests into one repository at once (two tags of one image; two jobs) make
        distribution 2.8 refuse an index now and then: while one rewrites a child's link, the
        other's index finds that child unknown (400 MANIFEST_BLOB_UNKNOWN)."""
        key = (registry, repo)
        lock, users = self._pushing.get(key, (asyncio.Lock(), 0))
        self._pushing[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._pushing[key]
            if users == 1:
                del self._pushing[key]
            else:
                self._pushing[key] = (lock, users - 1)

    def leader(self, registry: str, digest: str, source: str, account: str, repo: str) -> Upload | None:
        """The upload of this blob to this registry that a job reading `source`, for `repo`
        with `account`'s credentials, may wait for."""
        up = self._live.get((registry, digest))
        return up if up is not None and up.followed_by(source, account, repo) else None

    def lead(self, registry: str, digest: str, repo: str, source: str, account: str) -> Callable[[bool], None]:
        """Announce an upload; what to call, once, with whether the blob landed."""
        key = (registry, digest)
        up = Upload(repo, source, account, asyncio.get_running_loop().create_future())
        # One already led (a session to resume leads beside it) stays the one others follow.
        self._live.setdefault(key, up)

        def end(landed: bool) -> None:
            if self._live.get(key) is up:
                del self._live[key]
            if not up.landed.done():
                up.landed.set_result(landed)

        return end
