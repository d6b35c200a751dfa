"""Property-based API testing: schemathesis generates requests from the service's own OpenAPI
document (built from the request JSON Schema) and the real service must never answer 5xx."""

from __future__ import annotations

import json
import urllib.request

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from support.service import ServiceProcess

# Loaded lazily from the running service, so collection does not need it up.
schema = schemathesis.pytest.from_fixture("live_schema")


@pytest.fixture(scope="module")
def live_service(tmp_path_factory):
    # Generated requests name arbitrary registries: the service queues them but runs none, so no
    # traffic ever leaves this machine.
    svc = ServiceProcess(tmp_path_factory.mktemp("schemathesis"), {"PYDLIT_CONCURRENCY": "0"}).start()
    yield svc
    svc.stop(timeout=15)


@pytest.fixture(scope="module")
def live_schema(live_service):
    with urllib.request.urlopen(live_service.url + "/api/openapi.json", timeout=10) as resp:
        return schemathesis.openapi.from_dict(json.load(resp))


@schema.parametrize()
@hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), derandomize=True)
def test_no_input_makes_the_service_answer_5xx(case, live_service):
    response = case.call(base_url=live_service.url, timeout=10)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    case.validate_response(response, checks=[not_a_server_error])
