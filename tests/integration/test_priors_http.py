"""``/v1/priors`` over HTTP with the tiny random model: build, list, use, persist, errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server import corpora
from server.api import create_app
from server.loading import ModelBundle, load_model
from server.settings import Settings

TEXT = [
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel.",
    "And it came to pass, when the king heard these words, that he rent his clothes.",
]


@contextlib.contextmanager
def client(
    data_dir: Path, bundle: ModelBundle | None = None, **settings: Any
) -> Iterator[TestClient]:
    bundle = bundle or load_model("random:tiny", data_dir)
    app = create_app(Settings(model="random:tiny", data_dir=data_dir, **settings), bundle=bundle)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    with client(tmp_path, max_corpus_bytes=100_000) as c:
        yield c


def error(resp: Any, status: int, param: str | None) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["param"] == param and body["code"] == status
    return body["message"]


def generate(c: TestClient, steering: list[dict[str, Any]], **extra: Any) -> Any:
    body = {"prompt": "And the", "max_tokens": 8, "temperature": 0, "steering": steering}
    return c.post("/v1/generate", json={**body, **extra})


def test_create_list_get_delete(api: TestClient) -> None:
    r = api.post("/v1/priors", json={"name": "bible-1", "text": TEXT})
    assert r.status_code == 201, r.text
    card = r.json()
    tokens = sum(len(t.encode()) for t in TEXT)  # the tiny tokenizer is byte-level
    assert card["name"] == "bible-1" and card["estimator"] == "jelinek_mercer"
    assert card["orders"] == [1, 2, 3] and card["vocab_size"] == 259
    assert card["compatible"] is True and len(card["tokenizer_fingerprint"]) == 64
    assert card["corpus"] == {"source": "text", "documents": 2, "bytes": tokens, "tokens": tokens}
    counts = card["counts"]
    assert counts["tokens"] == tokens and counts["documents"] == 2
    assert counts["bigrams"] <= tokens - 2 and counts["trigrams"] <= tokens - 4
    assert card["default_weights"] == [0.1, 0.3, 0.6] and card["file_bytes"] > 0
    assert api.get("/v1/priors/bible-1").json() == card
    listing = api.get("/v1/priors").json()
    assert [p["name"] for p in listing["data"]] == ["bible-1"] and listing["skipped"] == []

    r = api.delete("/v1/priors/bible-1")
    assert r.status_code == 200 and r.json()["deleted"] is True
    error(api.get("/v1/priors/bible-1"), 404, "name")
    error(api.delete("/v1/priors/bible-1"), 404, "name")
    assert api.get("/v1/priors").json()["data"] == []


def test_kneser_ney_and_named_corpora(api: TestClient) -> None:
    r = api.post(
        "/v1/priors",
        json={
            "name": "kjv3",
            "corpus": "kjv",
            "max_documents": 3,
            "estimator": "kneser_ney",
            "discount": 0.5,
        },
    )
    # 3 chapters are ~11 kB, well under this fixture's 100 kB limit
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["estimator"] == "kneser_ney" and card["default_weights"] is None
    assert card["corpus"]["name"] == "kjv" and card["corpus"]["documents"] == 3
    assert card["params"] == {"discount": 0.5}
    r = api.post("/v1/priors", json={"name": "fort", "corpus": "fortunes", "max_documents": 40})
    assert r.status_code == 201, r.text
    assert r.json()["corpus"]["documents"] == 40
    corpora_list = {c["name"]: c for c in api.get("/v1/corpora").json()["data"]}
    assert corpora_list["kjv"]["installed"] and corpora_list["fortunes"]["installed"]


def test_generate_with_prior_and_style_diagnostics(api: TestClient) -> None:
    assert api.post("/v1/priors", json={"name": "p", "text": TEXT}).status_code == 201
    plain = generate(api, [], diagnostics=True).json()
    off = generate(api, [{"type": "ngram", "prior": "p", "lambda": 0}], diagnostics="steps").json()
    on = generate(api, [{"type": "ngram", "prior": "p", "lambda": 1}], diagnostics=True).json()
    assert off["token_ids"] == plain["token_ids"]  # λ = 0 is the unsteered decode
    assert on["token_ids"] != plain["token_ids"]
    assert "style_ppl" not in plain["diagnostics"]
    per_step = off["diagnostics"]["per_step"]["style_nll"]
    assert len(per_step) == 8 and all(x > 0 for x in per_step)
    assert on["diagnostics"]["style_ppl"] < off["diagnostics"]["style_ppl"]


def test_generate_errors_name_the_parameter(api: TestClient) -> None:
    assert api.post("/v1/priors", json={"name": "p", "text": TEXT}).status_code == 201
    msg = error(generate(api, [{"type": "ngram", "prior": "nope"}]), 404, "steering.0.prior")
    assert "unknown prior 'nope'" in msg
    msg = error(
        generate(api, [{"type": "ngram", "prior": "p", "lambda": 1.5}]), 400, "steering.0.lambda"
    )
    assert "1.5" in msg and "allow_lambda_above_one" in msg
    r = generate(
        api, [{"type": "ngram", "prior": "p", "lambda": 1.5, "allow_lambda_above_one": True}]
    )
    assert r.status_code == 200
    error(
        generate(api, [{"type": "ngram", "prior": "p", "weights": [1, 2]}]),
        400,
        "steering.0.weights",
    )
    error(generate(api, [{"type": "ngram", "prior": "p", "scale": 2}]), 400, "steering.0.scale")


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({"name": "-bad", "text": "x"}, 400, "name", "invalid name"),
        ({"name": "a/b", "text": "x"}, 400, "name", "invalid name"),
        ({"name": "x" * 65, "text": "x"}, 400, "name", "invalid name"),
        ({"name": 5, "text": "x"}, 400, "name", "valid string"),
        ({"text": "x"}, 400, "name", "required"),
        ({"name": "e", "text": ""}, 400, "text", "empty"),
        ({"name": "e", "text": ["  ", ""]}, 400, "text", "empty"),
        ({"name": "e", "text": []}, 400, "text", "empty"),
        ({"name": "e"}, 400, "text", "exactly one"),
        ({"name": "e", "text": "x", "corpus": "kjv"}, 400, "text", "exactly one"),
        ({"name": "e", "text": 7}, 400, "text", "invalid value"),
        ({"name": "e", "corpus": "nope"}, 404, "corpus", "unknown corpus 'nope'"),
        ({"name": "e", "corpus": "kjv", "max_documents": 0}, 400, "max_documents", "invalid"),
        ({"name": "e", "corpus": "kjv", "max_documents": "3"}, 400, "max_documents", "invalid"),
        ({"name": "e", "text": "x", "max_documents": 3}, 400, "max_documents", "named"),
        ({"name": "e", "text": "x", "estimator": "mle"}, 400, "estimator", "jelinek_mercer"),
        ({"name": "e", "text": "x", "weights": [1, 1]}, 400, "weights", "list of 3"),
        ({"name": "e", "text": "x", "weights": [0, 1, 1]}, 400, "weights.0", "unigram"),
        ({"name": "e", "text": "x", "weights": ["a", 1, 1]}, 400, "weights.0", "invalid"),
        ({"name": "e", "text": "x", "add_k": 0}, 400, "add_k", "[1e-300, 100]"),
        ({"name": "e", "text": "x", "add_k": 1e-320}, 400, "add_k", "[1e-300, 100]"),
        ({"name": "e", "text": "x", "discount": 0.5}, 400, "discount", "kneser_ney"),
        (
            {"name": "e", "text": "x", "estimator": "kneser_ney", "discount": 1.5},
            400,
            "discount",
            "(0, 1]",
        ),
        (
            {"name": "e", "text": "x", "estimator": "kneser_ney", "weights": [1, 1, 1]},
            400,
            "weights",
            "jelinek_mercer",
        ),
        ({"name": "e", "text": "x", "colour": "red"}, 400, "colour", "unknown field"),
        ({"name": "e", "text": "x" * 100_001}, 413, "text", "max_corpus_bytes"),
        ({"name": "e", "corpus": "kjv"}, 413, "corpus", "max_documents"),
    ],
)
def test_create_rejects(api: TestClient, body: dict, status: int, param: str, needle: str) -> None:
    assert needle in error(api.post("/v1/priors", json=body), status, param)
    assert api.get("/v1/priors").json()["data"] == []


def test_duplicate_name_is_409(api: TestClient) -> None:
    assert api.post("/v1/priors", json={"name": "p", "text": "abc abc"}).status_code == 201
    msg = error(api.post("/v1/priors", json={"name": "p", "text": "xyz"}), 409, "name")
    assert "already exists" in msg
    assert api.get("/v1/priors/p").json()["counts"]["tokens"] == 7  # the first one stays


def test_corpus_package_missing_is_404(
    api: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path / "no-such-dir")
    msg = error(api.post("/v1/priors", json={"name": "f", "corpus": "fortunes"}), 404, "corpus")
    assert "apt-get install fortunes" in msg
    listing = {c["name"]: c["installed"] for c in api.get("/v1/corpora").json()["data"]}
    assert listing["fortunes"] is False


def test_persistence_across_restart_and_corrupt_file(tmp_path: Path) -> None:
    with client(tmp_path) as c:
        card = c.post("/v1/priors", json={"name": "keep", "text": TEXT}).json()
        assert c.post("/v1/priors", json={"name": "broken", "text": "abc"}).status_code == 201
        before = generate(c, [{"type": "ngram", "prior": "keep", "lambda": 1}]).json()
    data = tmp_path / "priors" / "broken.safetensors"
    data.write_bytes(data.read_bytes()[:-5])  # truncated on disk
    with client(tmp_path) as c:
        listing = c.get("/v1/priors").json()
        assert [p["name"] for p in listing["data"]] == ["keep"]
        assert listing["skipped"][0]["name"] == "broken"
        assert "checksum" in listing["skipped"][0]["reason"]
        assert c.get("/v1/priors/keep").json()["sha256"] == card["sha256"]
        assert "corrupt" in error(c.get("/v1/priors/broken"), 404, "name")
        after = generate(c, [{"type": "ngram", "prior": "keep", "lambda": 1}]).json()
        assert after["token_ids"] == before["token_ids"]
        error(generate(c, [{"type": "ngram", "prior": "broken"}]), 404, "steering.0.prior")
        error(c.post("/v1/priors", json={"name": "broken", "text": "x"}), 409, "name")
        assert c.delete("/v1/priors/broken").status_code == 200
        assert c.post("/v1/priors", json={"name": "broken", "text": "abc"}).status_code == 201


def test_prior_of_another_tokenizer_is_400(tmp_path: Path) -> None:
    with client(tmp_path) as c:
        assert c.post("/v1/priors", json={"name": "p", "text": TEXT}).status_code == 201
    other = load_model("random:tiny", tmp_path)
    other.tokenizer.add_tokens(["<extra>"])  # a different vocabulary → another fingerprint
    with client(tmp_path, bundle=other) as c:
        assert c.get("/v1/priors/p").json()["compatible"] is False
        msg = error(generate(c, [{"type": "ngram", "prior": "p"}]), 400, "steering.0.prior")
        assert "another tokenizer" in msg


@pytest.mark.slow
def test_full_kjv_prior_with_smollm2(tmp_path: Path) -> None:
    """The real model: a ~1M-token prior builds in seconds and steers towards its style."""
    bundle = load_model("embedded:smollm2-135m-instruct", Settings().data_dir)
    with client(tmp_path, bundle=bundle) as c:
        r = c.post("/v1/priors", json={"name": "kjv", "corpus": "kjv"})
        assert r.status_code == 201, r.text
        card = r.json()
        assert card["counts"]["tokens"] > 900_000 and card["vocab_size"] == 49152
        # Timing is a benchmark's business (benchmarks/), not an assertion: only its shape.
        assert isinstance(card["build_seconds"], float) and card["build_seconds"] >= 0
        body = {
            "prompt": "The weather today",
            "max_tokens": 24,
            "temperature": 0,
            "diagnostics": True,
        }
        steered = {**body, "steering": [{"type": "ngram", "prior": "kjv", "lambda": 0.5}]}
        base = c.post(
            "/v1/generate",
            json={**body, "steering": [{"type": "ngram", "prior": "kjv", "lambda": 0}]},
        ).json()
        out = c.post("/v1/generate", json=steered).json()
        assert out["diagnostics"]["style_ppl"] < base["diagnostics"]["style_ppl"]


def test_hand_edited_metadata_still_lists(tmp_path: Path) -> None:
    """The JSON beside a stored prior is not checksummed (only the arrays are), so a
    hand-edited one whose build facts have the wrong types must not turn the card into
    a 500: the prior stays usable, the card leaves the malformed facts out."""
    import json

    with client(tmp_path) as c:
        assert c.post("/v1/priors", json={"name": "p", "text": TEXT}).status_code == 201
        before = generate(c, [{"type": "ngram", "prior": "p", "lambda": 1}]).json()
    meta_path = tmp_path / "priors" / "p.json"
    record = json.loads(meta_path.read_text())
    record["meta"]["info"] = {**record["meta"].get("info", {}), "build_seconds": "quick",
                              "counts": ["not", "a", "dict"]}
    meta_path.write_text(json.dumps(record))
    with client(tmp_path) as c:
        card = c.get("/v1/priors/p")
        assert card.status_code == 200, card.text
        body = card.json()
        assert "build_seconds" not in body and "counts" not in body
        assert body["sha256"] == record["sha256"] and body["estimator"]
        listing = c.get("/v1/priors")
        assert listing.status_code == 200 and [p["name"] for p in listing.json()["data"]] == ["p"]
        after = generate(c, [{"type": "ngram", "prior": "p", "lambda": 1}]).json()
        assert after["token_ids"] == before["token_ids"]
