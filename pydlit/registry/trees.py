"""Reading a whole image: a manifest and every manifest below it."""
from __future__ import annotations

import asyncio

from .client import RegistryClient
from .manifests import Manifest, Tree


async def read_tree(client: RegistryClient, repo: str, ref: str, parallel: int = 8) -> Tree:
    """The top manifest and every manifest below it, as pulled."""
    top = await client.get_manifest(repo, ref)
    tree = Tree(top)
    sem = asyncio.Semaphore(parallel)

    async def fetch(digest: str) -> Manifest:
        async with sem:
            return await client.get_manifest(repo, digest)

    level = list(top.children)
    seen: set[str] = set()
    while level:
        level = [d for d in dict.fromkeys(level) if d not in seen]
        seen.update(level)
        found = await asyncio.gather(*(fetch(d) for d in level))
        tree.children.extend(found)
        level = [c for m in found for c in m.children]
    return tree
