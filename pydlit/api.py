"""The HTTP API: thin handlers that validate, talk to the store, and answer JSON."""
from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from .keys import STORE, WORKER
from .schema import RequestError, validate_request

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

REDACTED = "<redacted>"


class ApiError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


@routes.post("/api/distribute/image")
async def distribute(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    try:
        req = validate_request(body)
    except RequestError as exc:
        raise ApiError(400, exc.msg) from None
    public, secrets = split_secrets(req)
    src = req["source"]
    targets = [
        {"endpoint": t["endpoint"], "image": t.get("image") or src["image"], "ref": t.get("ref") or src["ref"]}
        for t in req["targets"]
    ]
    job_id = await request.app[STORE].enqueue(public, secrets, targets, f"{src['endpoint']} {src['image']}:{src['ref']}")
    request.app[WORKER].notify()
    log.info("job %s: queued, %s:%s to %d target(s)", job_id, src["image"], src["ref"], len(targets))
    return web.json_response({"id": job_id, "msg": "Image sync started", "status": "success"}, status=201)


@routes.get("/api/distribute/image/{job_id}")
async def job_status(request: web.Request) -> web.Response:
    view = await request.app[STORE].job_view(request.match_info["job_id"])
    if view is None:
        raise ApiError(404, f"no job with id {request.match_info['job_id'][:64]!r}")
    return web.json_response(view)


@routes.get("/healthz")
async def health(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].check_writable()
    except Exception as exc:
        raise ApiError(503, f"the job database is not writable: {type(exc).__name__}") from None
    return web.json_response({"status": "ok"})


def split_secrets(req: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request as it may be stored in the clear, and its credentials on their own."""
    public = json.loads(json.dumps(req))
    secrets: dict[str, Any] = {"source": public["source"].pop("auth", None), "targets": []}
    for t in public["targets"]:
        secrets["targets"].append(t.pop("auth", None))
    for side, auth in [(public["source"], secrets["source"]), *zip(public["targets"], secrets["targets"])]:
        if auth:
            side["auth"] = {key: REDACTED for key in auth}
    return public, secrets
