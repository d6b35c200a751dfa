"""The OpenAPI document: well-formed, self-contained, and derived from REQUEST_SCHEMA."""
from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from pydlit.app import create_app
from pydlit.openapi import REQUEST_SCHEMA_NAME, build_openapi
from pydlit.registry.client import RetryPolicy
from pydlit.schema import ENDPOINT_PATTERN, REQUEST_SCHEMA
from pydlit.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[1] / "example" / "example_request.json"
DOC_URI = "urn:pydlit:test:openapi"
PATHS = {
    ("/api/distribute/image", "post"),
    ("/api/distribute/image", "get"),
    ("/api/distribute/image/{id}", "get"),
    ("/api/distribute/image/{id}", "delete"),
    ("/healthz", "get"),
    ("/metrics", "get"),
    ("/api/openapi.json", "get"),
}


@pytest.fixture(scope="module")
def doc() -> dict:
    return build_openapi()


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(doc: dict, ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve (at {part!r})"
        node = node[part]
    return node


def validator_for(doc: dict, ref: str) -> Draft202012Validator:
    """A validator of the schema at `ref`, resolving every $ref against the whole document."""
    registry = Registry().with_resource(DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": DOC_URI + ref}, registry=registry)


def request_schema_ref(doc: dict) -> str:
    return doc["paths"]["/api/distribute/image"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]


def unrewrite(node: Any) -> Any:
    text = json.dumps(node).replace('"#/components/schemas/', '"#/$defs/')
    return json.loads(text)


def test_is_valid_openapi_3_1(doc: dict) -> None:
    OpenAPIV31SpecValidator(doc).validate()


def test_header_paths_and_version(doc: dict) -> None:
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["version"] == "2.0.0"
    assert build_openapi("9.9.9")["info"]["version"] == "9.9.9"
    operations = {(path, method) for path, item in doc["paths"].items() for method in item if method != "parameters"}
    assert operations == PATHS
    json.dumps(doc)  # plain JSON, servable as is


def test_every_ref_resolves_inside_the_document(doc: dict) -> None:
    found = list(refs(doc))
    assert len(found) > 20
    for ref in found:
        resolve(doc, ref)
    text = json.dumps(doc)
    assert "$defs" not in text and '"$id"' not in text and '"$schema"' not in text


def test_request_schema_accepts_the_example_and_rejects_a_body_without_targets(doc: dict) -> None:
    validator = validator_for(doc, request_schema_ref(doc))
    example = json.loads(EXAMPLE.read_text())
    validator.validate(example)
    no_targets = copy.deepcopy(example)
    del no_targets["targets"]
    assert any(e.validator == "required" for e in validator.iter_errors(no_targets))
    bad_endpoint = copy.deepcopy(example)
    bad_endpoint["targets"][0]["endpoint"] = "ftp://localhost:5000"
    assert not validator.is_valid(bad_endpoint)
    unknown_key = copy.deepcopy(example)
    unknown_key["source"]["tag"] = "latest"
    assert not validator.is_valid(unknown_key)


def test_request_schema_takes_an_auth_json_payload_as_an_object_or_a_string(doc: dict) -> None:
    # The original pydlit's request reference gives it as a string holding the JSON object.
    validator = validator_for(doc, request_schema_ref(doc))
    example = json.loads(EXAMPLE.read_text())
    for payload in ({"username": "u"}, '{"username": "u"}'):
        example["source"]["auth"] = {"url": "https://auth.example/token", "json": payload}
        validator.validate(example)
    example["source"]["auth"]["json"] = 7
    assert not validator.is_valid(example)


def test_request_schema_is_exactly_request_schema_with_its_defs_moved(doc: dict) -> None:
    schemas = doc["components"]["schemas"]
    body = resolve(doc, request_schema_ref(doc))
    assert body is schemas[REQUEST_SCHEMA_NAME]
    rebuilt = {
        "$schema": REQUEST_SCHEMA["$schema"],
        "$id": REQUEST_SCHEMA["$id"],
        **unrewrite(body),
        "$defs": {name: unrewrite(schemas[name]) for name in REQUEST_SCHEMA["$defs"]},
    }
    assert rebuilt == REQUEST_SCHEMA
    assert schemas["endpoint"]["pattern"] == ENDPOINT_PATTERN


def test_building_leaves_request_schema_untouched_and_documents_independent() -> None:
    before = copy.deepcopy(REQUEST_SCHEMA)
    first = build_openapi()
    first["components"]["schemas"]["endpoint"]["pattern"] = "changed"
    first["components"]["schemas"]["JobStatus"]["properties"]["started_at"]["format"] = "changed"
    assert REQUEST_SCHEMA == before
    second = build_openapi()
    assert second["components"]["schemas"]["endpoint"]["pattern"] == ENDPOINT_PATTERN
    assert second["components"]["schemas"]["JobStatus"]["properties"]["finished_at"]["format"] == "date-time"


def test_security_is_a_bearer_token_except_for_healthz(doc: dict) -> None:
    scheme = doc["components"]["securitySchemes"]["apiToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "PYDLIT_API_TOKEN" in scheme["description"]
    assert doc["security"] == [{"apiToken": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert "401" in doc["paths"]["/api/distribute/image"]["post"]["responses"]


def test_list_parameters(doc: dict) -> None:
    params = {p["name"]: p for p in doc["paths"]["/api/distribute/image"]["get"]["parameters"]}
    assert params["state"]["schema"]["enum"] == ["QUEUED", "RUNNING", "FINISHED", "FAILED"]
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
    assert params["cursor"]["schema"] == {"type": "string"}
    page = validator_for(doc, "#/components/schemas/JobList")
    assert page.is_valid({"jobs": [], "next": None})
    assert not page.is_valid({"jobs": []})


# -- the documented JobStatus is what the service answers ------------------------------------------


@pytest_asyncio.fixture
async def client(aiohttp_client, tmp_path: Path):
    settings = Settings(
        db=str(tmp_path / "t.db"), node="test-node", concurrency=0, poll_s=0.05, heartbeat_s=0.05,
        retry=RetryPolicy(attempts=1, base_delay=0.0, max_delay=0.0, max_total=1.0),
    )
    return await aiohttp_client(create_app(settings))


@pytest.mark.asyncio
async def test_the_service_answers_documented_shapes(client, doc: dict) -> None:
    example = json.loads(EXAMPLE.read_text())
    resp = await client.post("/api/distribute/image", json=example)
    assert resp.status == 201
    accepted = await resp.json()
    validator_for(doc, "#/components/schemas/JobAccepted").validate(accepted)

    resp = await client.get(f"/api/distribute/image/{accepted['id']}")
    view = await resp.json()
    validator_for(doc, "#/components/schemas/JobStatus").validate(view)
    # Nothing the service answers goes undocumented.
    assert set(view) == set(doc["components"]["schemas"]["JobStatus"]["properties"])
    assert set(view["targets"][0]) == set(doc["components"]["schemas"]["TargetStatus"]["properties"])

    resp = await client.get("/api/distribute/image/no-such-job")
    assert resp.status == 404
    validator_for(doc, "#/components/schemas/Error").validate(await resp.json())

    resp = await client.post("/api/distribute/image", json={"source": example["source"]})
    assert resp.status == 400
    validator_for(doc, "#/components/schemas/Error").validate(await resp.json())

    resp = await client.get("/healthz")
    validator_for(doc, "#/components/schemas/Health").validate(await resp.json())
