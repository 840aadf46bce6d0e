"""Property-based fuzzing of every operation in the server's own OpenAPI schema.

Schemathesis generates valid and invalid requests from ``/openapi.json`` and sends them
to a live server over the tiny random model (generation limits are tiny, so any request
is a few decode steps). For every response: no 5xx, the status code is documented, the
body matches the documented schema, and anything that is not 2xx is the error envelope.
A seed and ``derandomize`` keep CI runs reproducible; examples per operation are few.
"""

from __future__ import annotations

import json
from typing import Any

import hypothesis
import hypothesis.strategies as st
import schemathesis
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig

from server.api.app import create_app
from server.api.protocol import GenerateResponse
from server.settings import Settings
from tests.conftest import LiveServer
from tests.hardening.conftest import CHEAP, assert_envelope

MAX_EXAMPLES = 25

CONFIG = SchemathesisConfig.from_dict({
    "seed": 20240611,
    "phases": {
        "examples": {"enabled": True},
        "fuzzing": {"enabled": True},
        "coverage": {"enabled": False},  # hundreds of boundary cases per operation
        "stateful": {"enabled": False},
    },
    "generation": {
        "max-examples": MAX_EXAMPLES, "mode": "all", "deterministic": True, "database": "none",
    },
})



def _schema_doc() -> dict[str, Any]:
    """The schema the live server serves (same app factory and settings; building an
    app loads no model). Loaded at import: schemathesis' lazy ``from_fixture`` loader
    does not work with pytest 9. ``test_schema_is_the_served_one`` checks they agree."""
    return create_app(Settings(model="random:tiny", **CHEAP)).openapi()


SCHEMA_DOC = _schema_doc()
schema = schemathesis.openapi.from_dict(SCHEMA_DOC, config=CONFIG)


@schemathesis.check
def error_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every non-2xx answer is ``{"error": {"message", "type", "param", "code"}}``."""
    if response.status_code < 300:
        return None
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return True


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_every_operation(case: Any, cheap_server: LiveServer) -> None:
    # positive_data_acceptance expects 2xx for any schema-valid body, but schema-valid
    # is not meaning-valid here (an unknown prior is a 404, max_tokens above the limit a
    # 400); those rejections are checked for their envelope instead.
    case.call_and_validate(
        base_url=cheap_server.url,
        timeout=60,
        additional_checks=[error_envelope],
        excluded_checks=[positive_data_acceptance],
    )


def test_schema_is_the_served_one(cheap_server: LiveServer) -> None:
    import httpx

    assert httpx.get(cheap_server.url + "/openapi.json", timeout=10).json() == SCHEMA_DOC


def test_schema_documents_every_error(cheap_server: LiveServer) -> None:
    """Every 4xx/5xx response in the schema is the ErrorResponse envelope, no operation
    documents FastAPI's 422 (the server answers 400), and bodies are described."""
    import httpx

    doc = httpx.get(cheap_server.url + "/openapi.json", timeout=10).json()
    ref = "#/components/schemas/ErrorResponse"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    ops = [(p, m, op) for p, ops in doc["paths"].items() for m, op in ops.items()]
    assert len(ops) >= 18
    for path, method, op in ops:
        responses = op["responses"]
        assert "422" not in responses, (method, path)
        for code, spec in responses.items():
            if code.startswith(("4", "5")) and path != "/health":
                schema_ref = spec["content"]["application/json"]["schema"]["$ref"]
                assert schema_ref == ref, (method, path, code)
        if "requestBody" in op:
            assert {"400", "413"} <= set(responses), (method, path)
        if method in ("post", "put"):
            assert "requestBody" in op, (method, path)
    gguf = doc["paths"]["/v1/control-vectors/{name}/gguf"]["put"]
    assert list(gguf["requestBody"]["content"]) == ["application/octet-stream"]
    assert gguf["requestBody"]["required"] is True
    for path in ("/v1/priors", "/v1/control-vectors"):
        assert "507" in doc["paths"][path]["post"]["responses"]
    assert "507" in gguf["responses"]


def test_unknown_paths_and_methods_use_the_envelope(cheap_server: LiveServer) -> None:
    import httpx

    with httpx.Client(base_url=cheap_server.url, timeout=10) as c:
        assert_envelope(c.get("/v1/nope"), 404)
        assert_envelope(c.delete("/v1/generate"), 405)
        assert_envelope(c.put("/v1/priors", json={}), 405)
        assert_envelope(c.post("/v1/models"), 405)


# ------------------------------------------------- property test: mostly-valid bodies
# Schema fuzzing seldom gets past validation (exactly one of prompt/messages, a served
# model name...). This strategy builds bodies that are valid or nearly so, so that the
# engine, the sampler and the steering processors run on odd but legal values.
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
steering_entry = st.one_of(
    st.fixed_dictionaries({"type": st.just("margin")}, optional={
        "tau": st.one_of(st.floats(0.01, 1.0), finite), "gamma": st.floats(0.0, 1.0)}),
    st.fixed_dictionaries({"type": st.just("logit_bias"), "bias": st.dictionaries(
        st.integers(-2, 300).map(str), st.one_of(st.floats(-100, 100), finite), max_size=4)}),
)
generate_body = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(min_size=1, max_size=24),
                         st.lists(st.integers(0, 258), min_size=1, max_size=12))},
    optional={
        "max_tokens": st.integers(1, 8),
        "temperature": st.one_of(st.just(0.0), st.floats(0.0, 3.0)),
        "top_p": st.floats(0.01, 1.0),
        "top_k": st.integers(-1, 400),
        "min_p": st.floats(0.0, 1.0),
        "repetition_penalty": st.floats(0.1, 10.0),
        "seed": st.integers(0, 2**63 - 1),
        "stop": st.one_of(st.text(min_size=1, max_size=3),
                          st.lists(st.text(min_size=1, max_size=3), max_size=3)),
        "stop_token_ids": st.lists(st.integers(0, 258), max_size=3),
        "min_tokens": st.integers(0, 2),
        "ignore_eos": st.booleans(),
        "stream": st.booleans(),
        "steering": st.lists(steering_entry, max_size=3),
        "diagnostics": st.one_of(st.booleans(), st.just("steps")),
    },
)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(body=generate_body)
def test_generate_property(cheap_server: LiveServer, body: dict[str, Any]) -> None:
    import httpx

    resp = httpx.post(cheap_server.url + "/v1/generate", json=body, timeout=60)
    if resp.status_code != 200:
        assert resp.status_code in (400, 404), resp.text
        assert_envelope(resp)
        return
    limit = body.get("max_tokens", CHEAP["default_max_tokens"])
    if body.get("stream"):
        frames = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]", resp.text[-200:]
        events = [json.loads(f) for f in frames[:-1]]
        assert "error" not in events[-1], events[-1]
        usage = events[-1]["usage"]
        tokens = sum(len(e["token_ids"]) for e in events)
    else:
        out = GenerateResponse.model_validate(resp.json())
        usage, tokens = out.usage.model_dump(), len(out.token_ids)
    assert tokens == usage["completion_tokens"] <= limit
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# ------------------------- every JSON media type, and integers beyond float range
# FastAPI parses application/json and every application/*+json alike, so the JSON guard
# must see them all; integers written out as digits past float range must be a 400
# naming the field wherever they land (free-form steering fields included), never the
# OverflowError a float() of them raises.
JSON_TYPES = ["application/json", "application/vnd.steer+json",
              "application/problem+json; charset=utf-8", "application/merge-patch+json"]
huge_int = st.integers(300, 1200).flatmap(
    lambda digits: st.sampled_from([1, -1]).map(lambda sign: sign * 10**digits))
JSON_BODIES: dict[str, dict[str, Any]] = {
    "/v1/generate": {"prompt": "hi", "max_tokens": 2, "steering": [
        {"type": "margin", "tau": 0.5}, {"type": "logit_bias", "bias": {"5": 1.0}}]},
    "/v1/sweep": {"request": {"prompt": "hi", "max_tokens": 2},
                  "grid": {"temperature": [0.0, 1.0]}},
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2, "logit_bias": {"7": 2}},
    "/v1/chat/completions": {"model": "tiny", "max_tokens": 2,
                             "messages": [{"role": "user", "content": "hi"}]},
    "/v1/priors": {"name": "fz", "text": "a b", "add_k": 0.5},
    "/v1/control-vectors": {"name": "fz", "pairs": [{"positive": "a b", "negative": "c d"}],
                            "layers": [1]},
}


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaves(v, (*path, i))]
    return [path]


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.data())
def test_huge_integers_under_every_json_media_type(cheap_server: LiveServer,
                                                  data: st.DataObject) -> None:
    import copy

    import httpx

    path = data.draw(st.sampled_from(sorted(JSON_BODIES)))
    body = copy.deepcopy(JSON_BODIES[path])
    where = data.draw(st.sampled_from(_leaves(body)))
    value = data.draw(huge_int)
    node: Any = body
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    ctype = data.draw(st.sampled_from(JSON_TYPES))
    resp = httpx.post(cheap_server.url + path, content=json.dumps(body).encode(),
                      headers={"content-type": ctype}, timeout=60)
    err = assert_envelope(resp, 400)
    assert err["param"] == ".".join(str(k) for k in where), (err, where)
