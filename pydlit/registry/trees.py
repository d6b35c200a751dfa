"""A whole image: reading a manifest and every manifest below it, and the order to push them in."""
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


def push_levels(tree: Tree) -> list[list[Manifest]]:
    """The manifests below the top in groups to push one after another, each group at once: a
    registry refuses an index naming a manifest it does not hold yet. A manifest goes one group
    after the highest of those it names, so a manifest named at two depths is still in time."""
    below = {m.digest: m for m in tree.children}
    height: dict[str, int] = {}

    def height_of(m: Manifest) -> int:
        if m.digest not in height:
            height[m.digest] = 1 + max((height_of(below[c]) for c in m.children if c in below), default=-1)
        return height[m.digest]

    levels: list[list[Manifest]] = []
    for m in tree.children:
        n = height_of(m)
        levels.extend([] for _ in range(n + 1 - len(levels)))
        levels[n].append(m)
    return levels
