"""The HTTP API: thin handlers that validate, talk to the store, and answer JSON."""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from typing import Any

from aiohttp import web

from .keys import STORE, WORKER
from .metrics import render
from .openapi import build_openapi
from .registry.manifests import image_ref
from .schema import RequestError, validate_request

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

REDACTED = "<redacted>"
JOB_STATES = ("QUEUED", "RUNNING", "FINISHED", "FAILED")
MAX_PAGE = 500
CANCEL_WAIT_STEPS = 50  # 0.1 s each
OPENAPI = build_openapi()


class ApiError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


@routes.post("/api/distribute/image")
async def distribute(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        try:
            req = validate_request(body)
        except RequestError as exc:
            raise ApiError(400, exc.msg) from None
        public, secrets = split_secrets(req)
    except RecursionError:
        # Only a free-form part (an auth `json` payload) or garbage can nest this deep.
        raise ApiError(400, "the body is nested too deeply") from None
    src = req["source"]
    targets = [
        {"endpoint": t["endpoint"], "image": t.get("image") or src["image"], "ref": t.get("ref") or src["ref"]}
        for t in req["targets"]
    ]
    image = image_ref(src["image"], src["ref"])
    job_id = await request.app[STORE].enqueue(public, secrets, targets, f"{src['endpoint']} {image}")
    request.app[WORKER].notify()
    log.info("job %s: queued, %s to %d target(s)", job_id, image, len(targets))
    return web.json_response({"id": job_id, "msg": "Image sync started", "status": "success"}, status=201)


@routes.get("/api/distribute/image/{job_id}")
async def job_status(request: web.Request) -> web.Response:
    view = await request.app[STORE].job_view(request.match_info["job_id"])
    if view is None:
        raise ApiError(404, f"no job with id {request.match_info['job_id'][:64]!r}")
    return web.json_response(view)


@routes.get("/api/distribute/image")
async def job_list(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    if state is not None and state not in JOB_STATES:
        raise ApiError(400, f"state must be one of {', '.join(JOB_STATES)}")
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise ApiError(400, "limit must be a whole number") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"limit must be between 1 and {MAX_PAGE}")
    cursor = request.query.get("cursor") or None
    if cursor is not None and (len(cursor) > 200 or "|" not in cursor):
        raise ApiError(400, "cursor is not one this service handed out")
    jobs, next_cursor = await request.app[STORE].list_jobs(state, limit, cursor)
    return web.json_response({"jobs": jobs, "next": next_cursor})


@routes.delete("/api/distribute/image/{job_id}")
async def job_cancel(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    was = await request.app[STORE].request_cancel(job_id)
    if was is None:
        raise ApiError(404, f"no job with id {job_id[:64]!r}")
    if was in ("FINISHED", "FAILED"):
        raise ApiError(409, f"the job already ended ({was}); there is nothing to cancel")
    log.info("job %s: cancel requested (was %s)", job_id, was)
    worker = request.app[WORKER]
    worker.cancel(job_id)
    worker.notify()  # a QUEUED job with upload sessions to give back is claimed for that
    # The worker ends the job once its uploads are cancelled at the registries; a short
    # bounded wait lets the answer show that end state in the common case.
    for _ in range(CANCEL_WAIT_STEPS):
        view = await request.app[STORE].job_view(job_id)
        if view is not None and view["value"] not in ("QUEUED", "RUNNING"):
            break
        await asyncio.sleep(0.1)
    return web.json_response(await request.app[STORE].job_view(job_id))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = render(await request.app[STORE].count_by_state())
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


@routes.get("/healthz")
async def health(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].check_writable()
    except Exception as exc:
        # SQLite's own words ("database is locked", "disk I/O error") name no secret.
        reason = str(exc) if isinstance(exc, sqlite3.Error) else type(exc).__name__
        raise ApiError(503, f"the job database is not writable: {reason}") from None
    return web.json_response({"status": "ok"})


def split_secrets(req: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request as it may be stored in the clear, and its credentials on their own."""
    public = json.loads(json.dumps(req))
    secrets: dict[str, Any] = {"source": public["source"].pop("auth", None), "targets": []}
    for t in public["targets"]:
        secrets["targets"].append(t.pop("auth", None))
    for side, auth in [(public["source"], secrets["source"]), *zip(public["targets"], secrets["targets"], strict=True)]:
        if auth:
            side["auth"] = {key: REDACTED for key in auth}
    return public, secrets
