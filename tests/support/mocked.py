"""aioresponses, made to work with the installed aiohttp.

aioresponses 0.7.9 builds ClientResponse without the `stream_writer` that aiohttp >= 3.12
requires; this shim supplies one, for plain answers and for callback answers alike.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiohttp
from aioresponses import CallbackResult
from aioresponses import aioresponses as _aioresponses


class _Response(aiohttp.ClientResponse):
    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class aioresponses(_aioresponses):
    def add(self, url: Any, method: str = "GET", *, callback: Any = None, response_class: Any = None, **kwargs: Any) -> None:
        if callback is not None:
            inner = callback

            def fix(result: Any) -> Any:
                if isinstance(result, CallbackResult) and result.response_class is None:
                    result.response_class = _Response
                return result

            if asyncio.iscoroutinefunction(inner):

                async def callback(url: Any, **kw: Any) -> Any:
                    return fix(await inner(url, **kw))

            else:

                def callback(url: Any, **kw: Any) -> Any:
                    return fix(inner(url, **kw))

        super().add(url, method, callback=callback, response_class=response_class or _Response, **kwargs)
