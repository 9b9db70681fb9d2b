"""The OpenAPI document (construct/http/openapi.json) is valid and matches the HTTP API's routes."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from construct.core.messaging import MAX_ACK_IDS
from construct.http import api
from construct.http.api import HttpApi

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Werkzeug adds HEAD to every GET rule (and may add OPTIONS); neither is part of the documented API.
IMPLICIT_METHODS = {"head", "options"}
DOCUMENT_URI = "urn:construct:openapi"


def load_document() -> dict:
    return json.loads((resources.files("construct.http") / "openapi.json").read_text(encoding="utf-8"))


def camel_case(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def openapi_path(rule: str) -> str:
    """Werkzeug's '/keys/<string:user_id>' as OpenAPI's '/keys/{userId}'."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: "{" + camel_case(m.group(1)) + "}", rule)


def app_routes() -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for rule in HttpApi.app.url_map.iter_rules():
        methods = {method.lower() for method in rule.methods or ()} - IMPLICIT_METHODS
        routes.setdefault(openapi_path(rule.rule), set()).update(methods)
    return routes


def documented_routes(document: dict) -> dict[str, set[str]]:
    return {path: {key for key in item if key in HTTP_METHODS} for path, item in document["paths"].items()}


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def test_document_is_valid_openapi_3_0_3():
    """The document passes openapi-spec-validator as OpenAPI 3.0.3."""
    document = load_document()
    assert document["openapi"] == "3.0.3"
    validate(document)


def test_document_is_served_from_v1():
    """Paths are relative to the /v1 mount point and the API uses bearer tokens."""
    document = load_document()
    assert document["servers"] == [{"url": "/v1"}]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"],
    }


def test_openapi_path_conversion():
    """Werkzeug converters become camelCase OpenAPI path parameters."""
    assert openapi_path("/keys/<string:user_id>") == "/keys/{userId}"
    assert openapi_path("/a/<some_long_name>/b") == "/a/{someLongName}/b"
    assert openapi_path("/messages/ack") == "/messages/ack"


def test_every_app_route_is_documented_with_its_methods():
    """Each Klein route appears in the document with exactly the same methods."""
    documented = documented_routes(load_document())
    routes = app_routes()
    assert routes, "HttpApi.app declares no routes"
    for path, methods in routes.items():
        assert path in documented, f"route {path} is not documented"
        assert documented[path] == methods, f"{path}: app has {sorted(methods)}, document has {sorted(documented[path])}"


def test_every_documented_route_exists_in_the_app():
    """Nothing is documented that the app does not serve."""
    routes = app_routes()
    for path, methods in documented_routes(load_document()).items():
        assert path in routes, f"documented path {path} is not a route of HttpApi.app"
        assert methods <= routes[path], f"{path}: documents {sorted(methods - routes[path])} the app does not serve"


def test_path_parameters_match_route_arguments():
    """Every {param} in a path is declared as a required path parameter, and nothing else is."""
    for path, method, operation in operations(load_document()):
        in_path = set(re.findall(r"{([^}]+)}", path))
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == in_path, f"{method.upper()} {path}"
        assert all(p["required"] for p in operation.get("parameters", []) if p["in"] == "path")


def test_every_error_response_uses_the_error_schema():
    """All 4xx and 5xx responses carry the shared {code, message} Error body."""
    document = load_document()
    shared = document["components"]["responses"]
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if not status.startswith(("4", "5")):
                continue
            if "$ref" in response:
                response = shared[response["$ref"].rsplit("/", 1)[1]]
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, f"{method.upper()} {path} {status}"


def test_authenticated_operations_declare_bearer_and_401():
    """Operations behind the bearer token say so and document 401; public ones have no security."""
    public = {("post", "/accounts"), ("post", "/sessions"), ("get", "/openapi.json"), ("post", "/messages/sealed"),
              ("get", "/server-keys")}
    for path, method, operation in operations(load_document()):
        if (method, path) in public:
            assert operation["security"] == [], f"{method.upper()} {path}"
            assert "401" not in operation["responses"] or path in ("/sessions", "/messages/sealed")
        else:
            assert operation["security"] == [{"bearerAuth": []}], f"{method.upper()} {path}"
            assert "401" in operation["responses"], f"{method.upper()} {path}"


def test_limits_match_the_implementation():
    """The documented long-poll and acknowledgement limits are the code's constants."""
    document = load_document()
    wait = next(p for p in document["paths"]["/messages"]["get"]["parameters"] if p["name"] == "wait")
    assert wait["schema"]["maximum"] == api.MAX_WAIT_SECONDS
    pending = document["components"]["schemas"]["PendingMessages"]["properties"]["messages"]
    assert pending["maxItems"] == api.MAX_PENDING_BATCH
    ack = document["components"]["schemas"]["AckRequest"]["properties"]["messageIds"]
    assert ack["maxItems"] == MAX_ACK_IDS


def _examples(document: dict):
    """(where, schema, example) for every example in the document."""
    for name, schema in document["components"]["schemas"].items():
        if "example" in schema:
            yield f"schema {name}", {"$ref": f"#/components/schemas/{name}"}, schema["example"]
    for name, response in document["components"]["responses"].items():
        for media in response.get("content", {}).values():
            if "example" in media:
                yield f"response {name}", media["schema"], media["example"]
    for path, method, operation in operations(document):
        bodies = [("request", operation.get("requestBody", {}))] + list(operation["responses"].items())
        for status, body in bodies:
            for media in body.get("content", {}).values():
                if "example" in media:
                    yield f"{method.upper()} {path} {status}", media["schema"], media["example"]


EXAMPLES = list(_examples(load_document()))


def test_document_has_examples():
    """The document illustrates its schemas and responses with examples."""
    assert len(EXAMPLES) >= 20


@pytest.mark.parametrize("where, schema, example", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_examples_match_their_schemas(where, schema, example):
    """Every example in the document is valid against the schema it illustrates."""
    document = load_document()
    registry = Registry().with_resource(DOCUMENT_URI, Resource(contents=document, specification=DRAFT4))
    if "$ref" in schema:
        schema = {"$ref": DOCUMENT_URI + schema["$ref"]}
    OAS30Validator(schema, registry=registry, format_checker=oas30_format_checker).validate(example)
