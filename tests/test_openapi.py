"""GET /openapi.json: a valid OpenAPI 3.1 document of every route, and the HTTP API fuzzed from
it with schemathesis against a real worker (answers must be documented and match their
schemas; no 5xx but the documented 503/504)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.config import SchemathesisConfig

from support import ROOT, Deployment, Worker

KEY = {"X-API-Key": "test-api-key"}
#: Examples per operation in the short run (make test); FUZZ_EXAMPLES scales the others.
EXAMPLES = 10


def generated() -> dict:
    """The document as the project command prints it (no worker, no broker)."""
    out = subprocess.run([sys.executable, "-m", "phoneverify.interfaces.cli", "schema",
                          "openapi"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_the_document_is_valid_openapi_31_and_lists_every_route():
    document = generated()
    validate(document)  # raises with the reason if it is not valid OpenAPI 3.1
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    seed = "/admin/extensions/DurableTaskExtension/instances/{instance_id}"
    for path, method in [
        ("/verifications", "post"), ("/verifications/{instance_id}", "get"),
        ("/verifications/{instance_id}/raiseEvent/{event_name}", "post"),
        ("/verifications/{instance_id}/terminate", "post"),
        ("/orchestrators/E4_SmsPhoneVerification", "post"), (seed, "get"),
        (f"{seed}/raiseEvent/{{event_name}}", "post"), (f"{seed}/terminate", "post"),
        ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/", "get"),
        ("/openapi.json", "get"), ("/twilio/status", "post"), ("/docs", "get"),
    ]:
        assert method in paths.get(path, {}), f"{method.upper()} {path} is not documented"
    undocumented = [f"{method.upper()} {path}" for path, item in paths.items()
                    for method, operation in item.items()
                    if isinstance(operation, dict) and operation.get("x-undocumented")]
    assert not undocumented, f"handlers without @openapi.operation: {undocumented}"
    # The bodies come from the handlers' models, not a copy.
    start = paths["/verifications"]["post"]
    assert start["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Started"}
    assert set(document["components"]["schemas"]["VerificationStatus"]["properties"]) >= {
        "runtimeStatus", "input", "output", "createdTime", "lastUpdatedTime"}
    assert {"apiKey": []} in start["security"]
    assert paths["/healthz"]["get"]["security"] == []


@pytest.fixture(scope="module")
def worker(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One worker for the module (the fuzz's operations share it)."""
    started = Worker(Deployment(kafka, tmp_path_factory.mktemp("openapi"))).start()
    yield started
    started.stop()


def test_the_worker_serves_it_without_the_key(worker: Worker):
    answer = requests.get(f"http://127.0.0.1:{worker.web_port}/openapi.json", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == generated()
    # Swagger UI from the package, no CDN: the page loads only its own files.
    page = requests.get(f"http://127.0.0.1:{worker.web_port}/docs", timeout=10)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert "http" not in page.text and '"/openapi.json"' in page.text
    script = requests.get(f"http://127.0.0.1:{worker.web_port}/docs/swagger-ui-bundle.js",
                          timeout=10)
    assert script.status_code == 200 and len(script.content) > 100_000


#: What a request valid by the schema may get besides 2xx: the state decides (unknown, in use,
#: concluded, rate-limited).
ACCEPTED = ["2xx", "404", "409", "410", "429"]
CONFIG = SchemathesisConfig.from_dict({
    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
    # A start's number may be valid by the schema (a string) and not by libphonenumber.
    "operations": [{"include-path-regex": "^/(verifications|orchestrators/[^/]+)$",
                    "checks": {"positive_data_acceptance": {
                        "expected-statuses": [*ACCEPTED, "400"]}}}],
})
#: Loaded when the tests are collected (schemathesis' lazy loader fails on pytest 9). The same
#: handlers serve the seed's paths and the /api aliases: each handler is fuzzed once.
schema = schemathesis.openapi.from_dict(generated(), config=CONFIG).exclude(
    path_regex="^/(api|admin|runtime)/")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_from_the_document(case: schemathesis.Case, worker: Worker):
    """Every answer is documented (status, content type, schema, headers); valid input is
    accepted and invalid input refused."""
    case.call_and_validate(base_url=f"http://127.0.0.1:{worker.web_port}", headers=KEY,
                           timeout=30)
    assert worker.process is not None and worker.process.poll() is None, worker.log()[-3000:]
