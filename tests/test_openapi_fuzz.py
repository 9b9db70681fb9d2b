"""The HTTP API fuzzed from its OpenAPI document (schemathesis) against a live server on 127.0.0.1.

For every documented operation, three kinds of generated requests: schema-valid ones (with a
real bearer token or whatever schemathesis makes up), schema-violating ones with a real token
(so the violation is in the path, query or body), and schema-violating ones with any
Authorization. Each must get no 5xx; a status code, content type, headers and body as
documented; and a schema-violating request must be refused with a 4xx.
"""

from __future__ import annotations

import json
import uuid
from importlib import resources

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import PASSWORD, make_bundle
from tests.processes import ServerProcess

pytestmark = pytest.mark.integration

EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
CONFIG = schemathesis.Config.from_dict(
    {
        # The API ignores query parameters it does not know, as HTTP APIs do.
        "generation": {"allow-extra-parameters": False},
        # 413 is how a body over the size limit is refused.
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422]}},
    }
)
DOCUMENT = json.loads((resources.files("construct.http") / "openapi.json").read_text(encoding="utf-8"))
LABELS = [
    f"{method.upper()} {path}"
    for path, item in DOCUMENT["paths"].items()
    for method in item
    if method in {"get", "put", "post", "delete", "patch"}
]
# Operations that can end the session or account they are called with: each call gets its own account.
SESSION_ENDING = {"DELETE /sessions/current", "DELETE /accounts/current", "PUT /accounts/current/password"}
PLACEHOLDER = "Bearer replaced-by-a-real-token"


class Api:
    """The live server, the schema, and an account whose session the cases may use."""

    def __init__(self, server: ServerProcess) -> None:
        self.base = f"http://127.0.0.1:{server.ports['http']}"
        self.http = requests.Session()
        self.schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
        self.token = self.new_account()

    def new_account(self) -> str:
        """Register an account; return its session token."""
        reply = self.http.post(
            f"{self.base}/v1/accounts",
            json={"username": f"f{uuid.uuid4().hex[:12]}", "password": PASSWORD, "publicKey": make_bundle()},
            timeout=10,
        )
        assert reply.status_code == 201, reply.text
        return reply.json()["sessionToken"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    # Registrations unlimited: session-ending cases each get an account of their own.
    server = ServerProcess(
        tmp_path_factory.mktemp("openapi-fuzz"), "--data-dir", "data", "--bcrypt-cost", "4", "--limit-registrations", "0"
    ).start()
    yield Api(server)
    log = server.log_text()
    assert server.process.poll() is None, f"the server exited:\n{log[-5000:]}"
    server.stop()
    assert "Traceback" not in log and "Unhandled" not in log, log[-20000:]


def secured(definition: dict) -> bool:
    return bool(definition.get("security", DOCUMENT.get("security")))


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("kind", ["valid", "invalid", "invalid-auth"])
def test_operation_conforms_and_never_fails(api, label, kind):
    """Generated requests get documented answers, never a 5xx; schema violations get a 4xx."""
    operation = api.schema.find_operation_by_label(label)
    assert operation is not None, label
    definition = DOCUMENT["paths"][operation.path][operation.method.lower()]
    if kind == "invalid-auth" and not secured(definition):
        pytest.skip("no Authorization to violate")
    if kind == "invalid" and not (definition.get("parameters") or definition.get("requestBody")):
        pytest.skip("no path, query or body to violate")
    if kind == "valid":
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    elif kind == "invalid" and secured(definition):
        # A fixed header is not negated: the violation lands in the path, query or body.
        strategy = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE, headers={"Authorization": PLACEHOLDER})
    else:
        strategy = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=strategy, own_token=st.booleans())
    def run(case, own_token):
        headers = None
        header_negated = case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER)
        placeholder = (case.headers or {}).get("Authorization") == PLACEHOLDER
        if secured(definition) and not header_negated and (own_token or placeholder):
            token = api.new_account() if label in SESSION_ENDING else api.token
            headers = {"Authorization": f"Bearer {token}"}
        if isinstance(case.query, dict) and "wait" in case.query:
            # The server honours a valid long-poll wait (up to 60 s): keep it short.
            try:
                if 0 < float(case.query["wait"]) <= 60:
                    case.query["wait"] = "0.05"
            except (TypeError, ValueError):
                pass
        response = case.call(base_url=f"{api.base}/v1", headers=headers, timeout=10, allow_redirects=False)
        case.validate_response(response, checks=CHECKS, headers=headers)

    try:
        run()
    except Unsatisfiable:
        # Only the path holds anything to violate, and schemathesis finds no violation of a path segment.
        pytest.skip("schemathesis generates no schema-violating request for this operation")
