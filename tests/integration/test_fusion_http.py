"""Fusion over HTTP: auxiliary models from settings (``random:tiny:SEED:LAYERS``),
/v1/models, both modes, an expert with its own chat template, 404/400 errors, and the
start-up refusal of a model with another vocabulary."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from server.api.state import ServerState
from server.auxiliary import AuxModelError
from server.loading import load_model
from server.settings import AuxModelSetting, Settings
from tests.conftest import LiveServer

AUX = [
    {"name": "small", "role": "small_base", "source": "random:tiny:22:1"},
    {"name": "e1", "role": "expert", "source": "random:tiny:23:1"},
    {"name": "chat-e", "role": "expert", "source": "random:tiny:24:2", "template": "chat"},
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from server.api.app import create_app

    tmp = tmp_path_factory.mktemp("fusion")
    strong = load_model("random:tiny:21:4", tmp)
    settings = Settings(model=strong.source, data_dir=tmp,
                        aux_models=[AuxModelSetting(**a) for a in AUX])
    with LiveServer(create_app(settings, bundle=strong)) as s:
        yield s


def gen(srv: Any, status: int = 200, **body: Any) -> dict[str, Any]:
    base = {"prompt": "the cat", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(srv.url + "/v1/generate", json={**base, **body}, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def test_models_lists_aux_models(srv: Any) -> None:
    data = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]
    roles = {m["id"]: m["role"] for m in data}
    assert roles == {"tiny:21:4": "main", "small": "small_base", "e1": "expert",
                     "chat-e": "expert"}
    fps = {m["tokenizer_fingerprint"] for m in data}
    assert len(fps) == 1 and len(fps.pop()) == 64
    assert all(m["vocab_size"] == 259 for m in data)


def test_fusion_both_modes(srv: Any) -> None:
    plain = gen(srv)
    zero = gen(srv, steering=[{"type": "fusion", "experts": ["e1"], "base": "small",
                               "mode": "static", "alpha": [0]}])
    assert zero["token_ids"] == plain["token_ids"]
    dyn = gen(srv, steering=[{"type": "fusion", "experts": ["e1", "chat-e"], "base": "small"}],
              diagnostics="steps")
    d = dyn["diagnostics"]
    assert len(d["per_step"]["fusion_alpha"]) == 6
    assert all(0 <= a <= 2.0 + 1e-6 for a in d["per_step"]["fusion_alpha"])
    assert set(d["per_step"]["fusion_expert"]) <= {0.0, 1.0}
    assert "fusion_alpha_mean" in d and "fusion_kl_fused_strong_mean" in d
    # the same request streamed gives the same tokens
    with httpx.stream("POST", srv.url + "/v1/generate", timeout=60, json={
        "prompt": "the cat", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "stream": True,
        "steering": [{"type": "fusion", "experts": ["e1", "chat-e"], "base": "small"}],
    }) as r:
        frames = [line for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [t for f in frames for t in json.loads(f[6:])["token_ids"]]
    assert streamed == dyn["token_ids"]


def test_expert_template_changes_its_prompt(srv: Any) -> None:
    """chat-e sees the chat-formatted prompt: fusing it differs from fusing a twin that
    would see the raw prompt (checked through the conversion)."""
    from server.api.convert import to_generation_request
    from server.api.protocol import GenerateRequest

    state = srv.app.state.steer
    body = GenerateRequest(prompt="hi", max_tokens=4, steering=[
        {"type": "fusion", "experts": ["chat-e", "e1"], "base": "small"}])
    req = to_generation_request(body, state.bundle, state.settings, state.env,
                                aux=state.aux)
    aux = dict(req.aux_prompt_ids)
    assert set(aux) == {"chat-e"}  # e1 and the base use the main prompt ids
    text = state.bundle.tokenizer.decode(list(aux["chat-e"]))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    msgs = gen(srv, prompt=None, messages=[{"role": "user", "content": "hi"}],
               steering=[{"type": "fusion", "experts": ["chat-e"], "base": "small",
                          "mode": "static", "alpha": [1.0]}])
    assert len(msgs["token_ids"]) == 6


@pytest.mark.parametrize(
    ("entry", "status", "param"),
    [
        ({"experts": ["nope"], "base": "small"}, 404, "steering.0.experts.0"),
        ({"experts": ["e1"], "base": "ghost"}, 404, "steering.0.base"),
        ({"experts": ["small"], "base": "small"}, 400, "steering.0.experts.0"),
        ({"experts": ["e1"], "base": "e1"}, 400, "steering.0.base"),
        ({"experts": ["e1"], "grid": {"step": 0}}, 400, "steering.0.grid.step"),
        ({"experts": ["e1"], "mode": "static", "alpha": [1, 2]}, 400, "steering.0.alpha"),
    ],
)
def test_fusion_errors(srv: Any, entry: dict[str, Any], status: int, param: str) -> None:
    err = gen(srv, status=status, steering=[{"type": "fusion", **entry}])["error"]
    assert err["param"] == param and err["code"] == status and err["message"]


def test_vocabulary_mismatch_fails_startup(tmp_path: Any) -> None:
    """An auxiliary model with another tokenizer: loading fails with a clear message (the
    CLI turns the loader's error into a non-zero exit)."""
    from server.tiny import tiny_model

    model, tok = tiny_model(5, num_hidden_layers=1)
    tok.add_tokens(["<other>"])
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    settings = Settings(model="random:tiny", data_dir=tmp_path, aux_models=[
        AuxModelSetting(name="other", role="expert", source=str(tmp_path / "other"))])
    state = ServerState(settings)
    errors: list[BaseException] = []
    state.load_in_background(on_error=errors.append).join(60)
    assert isinstance(errors[0], AuxModelError)
    assert "does not share the main model's vocabulary" in str(errors[0])
    assert state.status == "error" and state.engine is None


def test_all_four_methods_in_one_request(srv: Any) -> None:
    """ngram + control + fusion + margin (and logit_bias) together on the random model."""
    r = httpx.post(srv.url + "/v1/priors", timeout=60,
                   json={"name": "all4", "text": "the cat sat on the mat " * 30})
    assert r.status_code == 201, r.text
    r = httpx.post(srv.url + "/v1/control-vectors", timeout=60, json={
        "name": "all4", "pairs": [{"positive": "good day", "negative": "bad day"},
                                  {"positive": "so happy", "negative": "so sad"}],
        "layers": [1, 2]})
    assert r.status_code == 201, r.text
    stack = [
        {"type": "control", "vector": "all4", "alpha": 2.0},
        {"type": "fusion", "experts": ["e1"], "base": "small"},
        {"type": "ngram", "prior": "all4", "lambda": 0.4},
        {"type": "logit_bias", "bias": {"70": 1.0}},
        {"type": "margin", "tau": 0.5, "gamma": 1.0},
    ]
    out = gen(srv, steering=stack, diagnostics="steps")
    d = out["diagnostics"]
    assert len(out["token_ids"]) == 6 and "warnings" not in out
    for key in ("style_ppl", "base_ppl", "fusion_alpha_mean", "margin_acted_mean", "js_mean"):
        assert key in d, key
    # The same stack in a batch with an unsteered row leaves that row alone.
    plain = gen(srv)
    r = httpx.post(srv.url + "/v1/sweep", timeout=60, json={
        "request": {"prompt": "the cat", "max_tokens": 6, "temperature": 0, "ignore_eos": True},
        "grid": {"steering": [stack, []]}})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["response"]["token_ids"] == out["token_ids"]
    assert res[1]["response"]["token_ids"] == plain["token_ids"]
