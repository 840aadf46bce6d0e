"""The SDK's types cover the server's OpenAPI schema, so a field or enum value added on
the server without the SDK fails CI here (the SDK is a separate, torch-free package and
cannot import the server's models).

For each server schema, every property must be a field of the SDK type (by wire name),
and every ``enum``/``const`` value the server declares for it must validate against the
SDK field's annotation.
"""

from __future__ import annotations

from typing import Any, get_type_hints

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from clients import types as sdk
from server.api.app import create_app
from server.settings import Settings

# server schema name -> SDK type (the native API; OpenAI endpoints are the openai package's)
COVERED: dict[str, Any] = {
    "GenerateRequest": sdk.GenerateRequest,
    "ChatMessage": sdk.ChatMessage,
    "GenerateResponse": sdk.GenerateResponse,
    "Usage": sdk.Usage,
    "TokenLogprob": sdk.TokenLogprob,
    "TopLogprob": sdk.TopLogprob,
    "StreamEvent": sdk.StreamEvent,
    "SweepRequest": sdk.SweepRequest,
    "SweepPoint": sdk.SweepPoint,
    "SweepResponse": sdk.SweepResponse,
    "PriorCreate": sdk.PriorCreate,
    "VectorCreate": sdk.ControlVectorCreate,
    "Pair": sdk.ContrastPair,
    "PriorCard": sdk.Prior,
    "PriorList": sdk.PriorList,
    "CorpusList": sdk.CorpusList,
    "ControlVectorCard": sdk.ControlVector,
    "ControlVectorList": sdk.ControlVectorList,
    "Deleted": sdk.Deleted,
    "ModelCard": sdk.ModelCard,
    "ModelList": sdk.ModelList,
    "Health": sdk.Health,
}


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    doc = create_app(Settings(model="random:tiny")).openapi()
    # Stream frames (StreamEvent) are there too: server.api.app.STREAM_FRAMES.
    return dict(doc["components"]["schemas"])


def _sdk_fields(cls: Any) -> dict[str, Any]:
    """Wire name -> annotation of an SDK model or TypedDict."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {(f.alias or name): f.annotation for name, f in cls.model_fields.items()}
    return dict(get_type_hints(cls))


def _enum_values(prop: dict[str, Any]) -> list[Any]:
    """Every enum/const value declared for a property (through anyOf/oneOf branches)."""
    values = list(prop.get("enum", []))
    if "const" in prop:
        values.append(prop["const"])
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in prop.get(key, []):
            values += _enum_values(branch)
    if prop.get("type") == "array" and isinstance(prop.get("items"), dict):
        values += [[v] for v in _enum_values(prop["items"])]
    return values


def test_every_covered_schema_exists(schemas):
    assert set(COVERED) <= set(schemas), set(COVERED) - set(schemas)


@pytest.mark.parametrize("name", sorted(COVERED))
def test_sdk_type_has_every_server_field(schemas, name):
    server_props = set(schemas[name].get("properties", {}))
    missing = server_props - set(_sdk_fields(COVERED[name]))
    assert not missing, f"SDK {COVERED[name].__name__} lacks server fields {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(COVERED))
def test_sdk_type_accepts_every_server_enum_value(schemas, name):
    fields = _sdk_fields(COVERED[name])
    bad = []
    for prop_name, prop in schemas[name].get("properties", {}).items():
        for value in _enum_values(prop):
            try:
                TypeAdapter(fields[prop_name]).validate_python(value)
            except ValidationError:
                bad.append((prop_name, value))
    assert not bad, f"SDK {COVERED[name].__name__} rejects server values {bad}"


def test_the_check_catches_drift():
    """The oracle itself: a schema with a field and an enum value the SDK lacks fails."""
    fake = {"properties": {"prompt": {}, "brand_new": {}}}
    assert set(fake["properties"]) - set(_sdk_fields(sdk.GenerateRequest)) == {"brand_new"}
    enum_prop = {"anyOf": [{"type": "boolean"}, {"enum": ["steps", "tokens"]}]}
    ann = _sdk_fields(sdk.GenerateRequest)["diagnostics"]
    rejected = []
    for v in _enum_values(enum_prop):
        try:
            TypeAdapter(ann).validate_python(v)
        except ValidationError:
            rejected.append(v)
    assert rejected == ["tokens"]


def test_streaming_answers_name_their_frame_schema():
    """Each streaming endpoint's text/event-stream answer references the model its
    ``data:`` frames are built from, so OpenAPI documents the frames too."""
    doc = create_app(Settings(model="random:tiny")).openapi()
    frames = {"/v1/generate": "StreamEvent", "/v1/completions": "CompletionChunk",
              "/v1/chat/completions": "ChatCompletionChunk"}
    for path, name in frames.items():
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        ref = {"$ref": f"#/components/schemas/{name}"}
        assert content["text/event-stream"]["schema"] == ref
        assert "id" in doc["components"]["schemas"][name]["properties"]
