"""The OpenAPI 3.1 description of the HTTP API, built from the same REQUEST_SCHEMA that
validates POST bodies, so the published contract and the enforced one cannot drift apart."""
from __future__ import annotations

import copy
from typing import Any

from .schema import REQUEST_SCHEMA

_DEFS_PREFIX = "#/$defs/"
_COMPONENTS_PREFIX = "#/components/schemas/"
REQUEST_SCHEMA_NAME = "DistributeRequest"

JOB_STATES = ["QUEUED", "RUNNING", "FINISHED", "FAILED"]
TARGET_STATES = ["PENDING", "RUNNING", "FINISHED", "SKIPPED", "FAILED"]
LIST_LIMIT_MAX = 500
LIST_LIMIT_DEFAULT = 50

_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_NULLABLE_TEXT = {"type": ["string", "null"]}
_COUNT = {"type": "integer", "minimum": 0}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _COMPONENTS_PREFIX + name}


def _rewrite_refs(node: Any) -> Any:
    # Rebuilds every container, so REQUEST_SCHEMA itself is never touched.
    if isinstance(node, dict):
        return {
            key: (
                _COMPONENTS_PREFIX + value[len(_DEFS_PREFIX):]
                if key == "$ref" and isinstance(value, str) and value.startswith(_DEFS_PREFIX)
                else _rewrite_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def _request_schemas() -> dict[str, Any]:
    schema = _rewrite_refs(REQUEST_SCHEMA)
    # $id would re-base every "#/components/..." ref inside the schema onto the urn, where they
    # do not resolve; $schema restates the document's dialect, which some 3.1 tooling rejects.
    schema.pop("$id", None)
    schema.pop("$schema", None)
    defs = schema.pop("$defs", {})
    return {REQUEST_SCHEMA_NAME: schema, **defs}


def _own_schemas() -> dict[str, Any]:
    return {
        "Error": {
            "type": "object",
            "required": ["status", "msg"],
            "properties": {
                "status": {"const": "error"},
                "msg": {"type": "string", "description": "What went wrong; never contains a credential."},
            },
        },
        "JobAccepted": {
            "type": "object",
            "required": ["id", "msg", "status"],
            "properties": {
                "id": {"type": "string", "description": "The job id (a UUID)."},
                "msg": {"type": "string", "examples": ["Image sync started"]},
                "status": {"const": "success"},
            },
        },
        "TargetStatus": {
            "type": "object",
            "required": ["endpoint", "image", "ref", "state", "error", "retrying", "bytes_done", "bytes_total"],
            "properties": {
                "endpoint": {"type": "string", "description": "Exactly as posted."},
                "image": {"type": "string"},
                "ref": {"type": "string"},
                "state": {"enum": TARGET_STATES},
                "error": {
                    **_NULLABLE_TEXT,
                    "description": "Names the registry, the step, the HTTP status and the registry's error code.",
                },
                "retrying": {
                    **_NULLABLE_TEXT,
                    "description": (
                        "While the target runs: when and what it is waiting out (a transient failure being"
                        " retried); null once bytes move again, and when it ends."
                    ),
                },
                "bytes_done": _COUNT,
                "bytes_total": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "description": "Null until the source's manifests have been read.",
                },
            },
        },
        "JobStatus": {
            "type": "object",
            "required": [
                "id", "value", "created_at", "started_at", "finished_at", "finished_endpoints",
                "skipped_clusters", "error", "attempt", "cancel_requested", "source", "bytes_done", "bytes_total", "targets",
            ],
            "properties": {
                "id": {"type": "string"},
                "value": {
                    "enum": JOB_STATES,
                    "description": (
                        "FINISHED: every target finished or was skipped. FAILED: the source could not"
                        " be read (see error) or a target failed for good."
                    ),
                },
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": _NULLABLE_TIME,
                "finished_at": _NULLABLE_TIME,
                "finished_endpoints": {"type": "array", "items": {"type": "string"}},
                "skipped_clusters": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Targets whose tag held another digest while overwrite was false.",
                },
                "error": {**_NULLABLE_TEXT, "description": "Why the whole job failed."},
                "attempt": {**_COUNT, "description": "How many times a worker has claimed the job."},
                "cancel_requested": {
                    "type": "boolean",
                    "description": (
                        "A DELETE asked for the job to end. While it is still QUEUED or RUNNING, it lets its"
                        " chunks on their way through and gives its upload sessions back, then ends FAILED"
                        " with the error 'cancelled'."
                    ),
                },
                "source": {"type": "string", "description": "'<endpoint> <image>:<ref>'."},
                "bytes_done": _COUNT,
                "bytes_total": _COUNT,
                "targets": {"type": "array", "items": _ref("TargetStatus")},
            },
        },
        "JobList": {
            "type": "object",
            "required": ["jobs", "next"],
            "properties": {
                "jobs": {"type": "array", "items": _ref("JobStatus"), "description": "Newest first."},
                "next": {
                    **_NULLABLE_TEXT,
                    "description": "Pass as cursor to get the next page; null on the last page.",
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
        },
    }


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema_name)}}}


def _responses() -> dict[str, Any]:
    return {
        "BadRequest": _json("Error", "The request is malformed; msg names the JSON path of the problem."),
        "Unauthorized": _json("Error", "An API token is configured and the request lacks it or has another."),
        "NotFound": _json("Error", "No job with this id."),
        "JobStatus": _json("JobStatus", "The job's status."),
    }


def _response_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _paths() -> dict[str, Any]:
    job_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "The id answered by POST /api/distribute/image.",
        "schema": {"type": "string"},
    }
    return {
        "/api/distribute/image": {
            "post": {
                "operationId": "distributeImage",
                "summary": "Queue a copy of one image to one or more target registries",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(REQUEST_SCHEMA_NAME)}},
                },
                "responses": {
                    "201": _json("JobAccepted", "The job is committed to the database and queued."),
                    "400": _response_ref("BadRequest"),
                    "401": _response_ref("Unauthorized"),
                    "413": _json("Error", "The body is larger than 1 MiB."),
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "List jobs, newest first",
                "parameters": [
                    {"name": "state", "in": "query", "schema": {"enum": JOB_STATES}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": LIST_LIMIT_MAX,
                            "default": LIST_LIMIT_DEFAULT,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "Opaque: the `next` of the previous page.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _json("JobList", "One page of jobs."),
                    "400": _response_ref("BadRequest"),
                    "401": _response_ref("Unauthorized"),
                },
            },
        },
        "/api/distribute/image/{id}": {
            "parameters": [job_id],
            "get": {
                "operationId": "getJob",
                "summary": "A job's status and per-target progress",
                "responses": {
                    "200": _response_ref("JobStatus"),
                    "401": _response_ref("Unauthorized"),
                    "404": _response_ref("NotFound"),
                },
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a queued or running job",
                "responses": {
                    "200": _response_ref("JobStatus"),
                    "401": _response_ref("Unauthorized"),
                    "404": _response_ref("NotFound"),
                    "409": _json("Error", "The job already ended."),
                },
            },
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness: the process is up and the job database takes a write",
                "security": [],
                "responses": {
                    "200": _json("Health", "Healthy."),
                    "503": _json("Error", "The job database is not writable."),
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _response_ref("Unauthorized"),
                },
            },
        },
        "/api/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": _response_ref("Unauthorized"),
                },
            },
        },
    }


def build_openapi(version: str = "2.0.0") -> dict[str, Any]:
    """The OpenAPI 3.1.0 document of the pydlit API; a fresh object on every call."""
    request_schemas = _request_schemas()
    own = _own_schemas()
    clash = request_schemas.keys() & own.keys()
    if clash:
        raise RuntimeError(f"REQUEST_SCHEMA $defs clash with API schema names: {sorted(clash)}")
    # Deep-copied so that a caller editing its document cannot alter the shared fragments above.
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {
            "title": "pydlit",
            "version": version,
            "description": (
                "Daemon-less image distribution: copy one container image from a source registry"
                " to many target registries. POST a request, get a job id at once, poll the job."
            ),
        },
        "security": [{"apiToken": []}],
        "paths": _paths(),
        "components": {
            "schemas": {**request_schemas, **own},
            "responses": _responses(),
            "securitySchemes": {
                "apiToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "Required only when the service runs with PYDLIT_API_TOKEN set; then every"
                        " endpoint but /healthz answers 401 without `Authorization: Bearer <token>`."
                    ),
                },
            },
        },
    })
