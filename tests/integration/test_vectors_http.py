"""``/v1/control-vectors`` over HTTP with the tiny random model: extract, import/export
GGUF (and the layer convention with an independently written file), use, persist, errors."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from server.api import create_app
from server.loading import ModelBundle, load_model
from server.settings import Settings

D = 32  # the tiny model's hidden size (2 blocks)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return load_model("random:tiny", tmp_path_factory.mktemp("tiny"))


@contextlib.contextmanager
def client(data_dir: Path, bundle: ModelBundle) -> Iterator[TestClient]:
    app = create_app(Settings(model="random:tiny", data_dir=data_dir), bundle=bundle)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def api(tmp_path: Path, bundle: ModelBundle) -> Iterator[TestClient]:
    with client(tmp_path, bundle) as c:
        yield c


def error(resp: Any, status: int, param: str | None) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["param"] == param and body["code"] == status
    return body["message"]


def generate(c: TestClient, steering: list[dict[str, Any]], **extra: Any) -> Any:
    body = {"prompt": "And the", "max_tokens": 8, "temperature": 0, "steering": steering}
    return c.post("/v1/generate", json={**body, **extra})


def llama_cpp_file(directions: dict[int, np.ndarray], dtype: Any = np.float32) -> bytes:
    """A control-vector file written directly with gguf.GGUFWriter, in the layout
    repeng's ``export_gguf`` uses (independent of the server's exporter)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.gguf"
        w = gguf.GGUFWriter(str(path), "controlvector")
        w.add_string("controlvector.model_hint", "llama")
        w.add_uint32("controlvector.layer_count", len(directions))
        for layer, arr in directions.items():
            w.add_tensor(f"direction.{layer}", arr.astype(dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


PAIRS = [
    {"positive": f"I love the {w}. It is great", "negative": f"I hate the {w}. It is awful"}
    for w in ("cat", "dog", "sun", "rain", "tea", "car", "song", "town", "book", "game")
]


def test_extract_list_get_use_delete(api: TestClient) -> None:
    r = api.post("/v1/control-vectors", json={"name": "mood", "pairs": PAIRS})
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["layers"] == [1] and card["hidden_size"] == D  # default: every block but 0
    assert card["method"] == "pca_diff" and card["pairs"] == 10 and card["source"] == "extracted"
    (sep,) = card["separation"]
    assert sep["layer"] == 1 and sep["accuracy"] >= 0.9 and sep["separation"] > 1
    assert card["norms"]["1"] == pytest.approx(sep["gap"], rel=1e-4)
    assert api.get("/v1/control-vectors/mood").json() == card
    listing = api.get("/v1/control-vectors").json()
    assert [v["name"] for v in listing["data"]] == ["mood"] and listing["skipped"] == []

    r = api.post("/v1/control-vectors", json={
        "name": "mood2", "template": "I {} the {}", "positive_words": [], "negative_words": [],
    })
    error(r, 400, "template")
    r = api.post("/v1/control-vectors", json={
        "name": "mood2", "template": "I {} it.", "positive_words": ["love", "like"],
        "negative_words": ["hate", "loathe"], "suffixes": [" Yes", " Well", " So"],
        "layers": [0, 1], "method": "mean_diff",
    })
    assert r.status_code == 201, r.text
    assert r.json()["pairs"] == 6 and r.json()["layers"] == [0, 1]

    plain = generate(api, []).json()["token_ids"]
    zero = generate(api, [{"type": "control", "vector": "mood", "alpha": 0}]).json()
    assert zero["token_ids"] == plain
    on = generate(api, [{"type": "control", "vector": "mood2", "alpha": 8}], diagnostics=True)
    assert on.status_code == 200, on.text
    diag = on.json()["diagnostics"]
    assert on.json()["token_ids"] != plain
    assert diag["kl_base_steered_first"] > 0 and diag["entropy_steered_first"] > 0

    assert api.delete("/v1/control-vectors/mood").json()["deleted"] is True
    error(api.get("/v1/control-vectors/mood"), 404, "name")
    error(api.delete("/v1/control-vectors/mood"), 404, "name")
    msg = error(generate(api, [{"type": "control", "vector": "mood"}]), 404, "steering.0.vector")
    assert "unknown control vector 'mood'" in msg


def test_separation_on_a_held_out_toy_contrast(api: TestClient, bundle: ModelBundle) -> None:
    """The fitted direction separates pairs it was not fitted on (random model)."""
    r = api.post("/v1/control-vectors", json={"name": "m", "pairs": PAIRS[:6], "layers": [1]})
    assert r.status_code == 201
    exported = api.get("/v1/control-vectors/m/gguf").content
    reader = gguf.GGUFReader(_tmp(exported))
    u = torch.tensor(np.array(reader.tensors[0].data), dtype=torch.float32)
    from server.api.vectors import last_token_states

    tok = bundle.tokenizer
    held = [t for p in PAIRS[6:] for t in (p["positive"], p["negative"])]
    states = last_token_states(bundle.model, tok(held)["input_ids"], [1])[1]
    proj = states @ u
    assert bool((proj[0::2] > proj[1::2]).all())


def _tmp(data: bytes) -> str:
    f = tempfile.NamedTemporaryFile(suffix=".gguf", delete=False)
    f.write(data)
    f.close()
    return f.name


def test_gguf_round_trip_and_export(api: TestClient) -> None:
    rng = np.random.default_rng(0)
    dirs = {0: rng.standard_normal(D).astype(np.float32), 1: rng.standard_normal(D)}
    r = api.put("/v1/control-vectors/imp/gguf", content=llama_cpp_file(dirs))
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "gguf" and r.json()["model_hint"] == "llama"
    out = api.get("/v1/control-vectors/imp/gguf")
    assert out.status_code == 200 and out.headers["content-type"] == "application/octet-stream"
    reader = gguf.GGUFReader(_tmp(out.content))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    count = reader.get_field("controlvector.layer_count")
    assert int(count.parts[count.data[0]][0]) == 2
    got = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(got) == ["direction.0", "direction.1"]
    for k, v in dirs.items():
        assert got[f"direction.{k}"].tobytes() == v.astype(np.float32).tobytes()
    r = api.put("/v1/control-vectors/again/gguf", content=out.content)  # our export imports
    assert r.status_code == 201 and r.json()["norms"] == api.get(
        "/v1/control-vectors/imp").json()["norms"]


def test_independent_file_applies_at_the_documented_block(
    api: TestClient, bundle: ModelBundle
) -> None:
    """``direction.1`` from a file we did not write is added to block 1's output
    (``model.model.layers[1]``), as llama.cpp does."""
    v = (4 * np.random.default_rng(3).standard_normal(D)).astype(np.float32)
    r = api.put("/v1/control-vectors/ext/gguf", content=llama_cpp_file({1: v}))
    assert r.status_code == 201
    alpha = 1.5
    got = generate(api, [{"type": "control", "vector": "ext", "alpha": alpha}]).json()["token_ids"]
    model, tok = bundle.model, bundle.tokenizer

    def greedy(layer: int | None) -> list[int]:
        handle = None
        if layer is not None:
            delta = alpha * torch.from_numpy(v)
            handle = model.model.layers[layer].register_forward_hook(
                lambda m, a, out: out + delta
            )
        try:
            ids = list(tok("And the")["input_ids"])
            n = len(ids)
            with torch.inference_mode():
                for _ in range(8):
                    x = torch.tensor([ids])
                    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
                    ids.append(int(logits[0, -1].argmax()))
            return ids[n:]
        finally:
            if handle is not None:
                handle.remove()

    assert got == greedy(1)
    assert got != greedy(0) and got != greedy(None)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(300), "not a GGUF"),
        (llama_cpp_file({1: np.ones(D)})[:-16], "does not parse"),
        (llama_cpp_file({1: np.ones(D + 4)}), "hidden size is 32"),
        (llama_cpp_file({1: np.ones(D)}, np.float16), "must be F32"),
        (llama_cpp_file({}), "no 'direction.N'"),
        (llama_cpp_file({5: np.ones(D)}), "model has 2 blocks"),
    ],
)
def test_bad_gguf_is_400(api: TestClient, body: bytes, needle: str) -> None:
    assert needle in error(api.put("/v1/control-vectors/bad/gguf", content=body), 400, "body")
    assert api.get("/v1/control-vectors").json()["data"] == []


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({"name": "-x", "pairs": PAIRS}, 400, "name", "invalid name"),
        ({"name": "x"}, 400, "pairs", "exactly one"),
        ({"name": "x", "pairs": []}, 400, "pairs", "empty"),
        ({"name": "x", "pairs": PAIRS, "template": "{a|b}"}, 400, "pairs", "exactly one"),
        ({"name": "x", "pairs": [{"positive": "a"}]}, 400, "pairs.0.negative", "required"),
        ({"name": "x", "pairs": [{"positive": "a", "negative": "b"}]}, 400, "pairs", "2 are"),
        ({"name": "x", "pairs": PAIRS, "method": "umap"}, 400, "method", "pca_diff"),
        ({"name": "x", "pairs": PAIRS, "layers": [2]}, 400, "layers", "2 blocks"),
        ({"name": "x", "pairs": PAIRS, "layers": ["1"]}, 400, "layers.0", "integer"),
        ({"name": "x", "pairs": PAIRS * 103}, 413, "pairs", "limit"),
        ({"name": "x", "pairs": PAIRS, "colour": 1}, 400, "colour", "unknown field"),
    ],
)
def test_create_rejects(api: TestClient, body: dict, status: int, param: str, needle: str) -> None:
    assert needle in error(api.post("/v1/control-vectors", json=body), status, param)
    assert api.get("/v1/control-vectors").json()["data"] == []


def test_name_taken_is_409_and_generate_errors(api: TestClient) -> None:
    assert api.post("/v1/control-vectors", json={"name": "v", "pairs": PAIRS}).status_code == 201
    error(api.post("/v1/control-vectors", json={"name": "v", "pairs": PAIRS}), 409, "name")
    f = llama_cpp_file({1: np.ones(D)})
    error(api.put("/v1/control-vectors/v/gguf", content=f), 409, "name")
    msg = error(generate(api, [{"type": "control", "vector": "v", "layers": [0]}]), 400,
                "steering.0.layers")
    assert "no direction for layer 0" in msg
    error(generate(api, [{"type": "control", "vector": "v", "alpha": 1e3}]), 400,
          "steering.0.alpha")
    error(generate(api, [{"type": "control", "vector": "v", "positions": "x"}]), 400,
          "steering.0.positions")


def test_persistence_across_restart_and_corrupt_file(tmp_path: Path, bundle: ModelBundle) -> None:
    steer = [{"type": "control", "vector": "keep", "alpha": 3}]
    with client(tmp_path, bundle) as c:
        card = c.post("/v1/control-vectors", json={"name": "keep", "pairs": PAIRS}).json()
        assert c.put("/v1/control-vectors/broken/gguf",
                     content=llama_cpp_file({1: np.ones(D)})).status_code == 201
        before = generate(c, steer).json()["token_ids"]
    data = tmp_path / "control-vectors" / "broken.safetensors"
    data.write_bytes(data.read_bytes()[:-5])
    with client(tmp_path, bundle) as c:
        listing = c.get("/v1/control-vectors").json()
        assert [v["name"] for v in listing["data"]] == ["keep"]
        assert listing["skipped"][0]["name"] == "broken"
        assert "checksum" in listing["skipped"][0]["reason"]
        assert c.get("/v1/control-vectors/keep").json()["sha256"] == card["sha256"]
        assert "corrupt" in error(c.get("/v1/control-vectors/broken"), 404, "name")
        assert generate(c, steer).json()["token_ids"] == before
        error(c.put("/v1/control-vectors/broken/gguf", content=llama_cpp_file({1: np.ones(D)})),
              409, "name")
        assert c.delete("/v1/control-vectors/broken").status_code == 200


def test_receipt_in_responses_streams_and_the_sdk(api: TestClient) -> None:
    """Every response with a control entry carries a receipt (native JSON and the stream's
    final frame, typed in the SDK); a response without one has none."""
    import json

    from clients import After, Control, GenerateResponse, Schedule, Tokens
    from clients.steering import Ablate

    rng = np.random.default_rng(3)
    r = api.put("/v1/control-vectors/rc/gguf",
                content=llama_cpp_file({1: rng.standard_normal(D).astype(np.float32)}))
    assert r.status_code == 201, r.text
    steering = [Ablate("rc").to_wire(),
                Control("rc", Schedule(2.0, 0.0, 4, "cosine"), positions=Tokens(1, 5)).to_wire(),
                {"type": "logit_bias", "bias": {"5": 1.0}},
                Control("rc", 1.0, positions=After("\x00never")).to_wire()]
    body = generate(api, steering)
    assert body.status_code == 200, body.text
    resp = GenerateResponse.model_validate(body.json())
    assert resp.receipt is not None
    ab, sch, aft = resp.receipt.entries
    assert [ab.index, sch.index, aft.index] == [0, 1, 3]  # positions in the steering list
    assert (ab.mode, ab.layers, ab.generated_positions) == ("ablate", [1], 7)
    assert ab.prompt_positions > 0
    assert ab.per_layer["1"].component_mean is not None
    assert ab.per_layer["1"].delta_mean == pytest.approx(ab.per_layer["1"].component_mean)
    assert (sch.prompt_positions, sch.generated_positions) == (0, 4)
    assert sch.per_layer["1"].delta_max is not None and sch.per_layer["1"].delta_max > 0
    assert (aft.generated_positions, aft.per_layer["1"].delta_mean) == (0, None)
    assert generate(api, []).json().get("receipt") is None
    with api.stream("POST", "/v1/generate", json={
        "prompt": "And the", "max_tokens": 8, "temperature": 0, "steering": steering,
        "stream": True}) as s:
        frames = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "receipt" not in frames[0] and frames[-1]["receipt"] == body.json()["receipt"]
    error(generate(api, [{"type": "control", "vector": "rc", "mode": "ablate",
                          "strength": 2}]), 400, "steering.0.strength")
    error(generate(api, [{"type": "control", "vector": "rc",
                          "positions": {"from": 4, "to": 2}}]), 400, "steering.0.positions.to")


def test_extraction_is_an_engine_job_bounded_and_cancellable(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    """Extraction forwards run on the engine thread; a full engine queue is the 429 a
    generation gets; a build that times out while queued is cancelled and never runs."""
    import threading

    from server.engine.extract import ExtractionJob

    settings = Settings(model="random:tiny", data_dir=tmp_path, max_queue=2,
                        build_timeout_s=2.0)
    app = create_app(settings, bundle=bundle)
    seen: list[str] = []  # thread of every forward without a cache (extraction)
    started, release = threading.Event(), threading.Event()
    block = {"on": False}

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs.get("use_cache"):
            return
        seen.append(threading.current_thread().name)
        if block["on"] and not started.is_set():
            started.set()
            release.wait(30)

    handle = bundle.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with TestClient(app) as c:
            body = {"pairs": PAIRS[:4], "layers": [1]}
            assert c.post("/v1/control-vectors", json={"name": "a", **body}).status_code == 201
            assert seen and set(seen) == {"steer-engine"}
            # Hold the engine inside one job's forward.
            engine = app.state.steer.engine
            block["on"] = True
            tok = bundle.tokenizer
            held = engine.submit_job(ExtractionJob([tok("x y z")["input_ids"]], (1,)))
            assert started.wait(30)
            seen.clear()
            # One free slot: this build queues, times out, and is cancelled unrun.
            r = c.post("/v1/control-vectors", json={"name": "late", **body})
            assert r.status_code == 413 and r.json()["error"]["code"] == "build_timeout"
            # Its cancelled job keeps its slot until the engine next runs (as a cancelled
            # waiting request does), so the queue is now full.
            r = c.post("/v1/control-vectors", json={"name": "full", **body})
            assert r.status_code == 429 and r.headers["retry-after"].isdigit(), r.text
            gen = generate(c, [])
            assert gen.status_code == 429  # the same queue, the same answer
            release.set()
            held.result.result(timeout=30)
            assert c.get("/v1/control-vectors/late").status_code == 404
            assert c.get("/v1/control-vectors/full").status_code == 404
            assert c.post("/v1/control-vectors", json={"name": "b", **body}).status_code == 201
        # After release only "b" ran (1 forward of 8 texts); the timed-out build's job
        # was dropped unrun.
        assert len(seen) == 1
    finally:
        release.set()
        handle.remove()


def test_hand_edited_metadata_still_lists(tmp_path: Path, bundle: ModelBundle) -> None:
    """Only the arrays are checksummed: a hand-edited JSON whose build facts have the
    wrong types keeps the vector usable and its card leaves those facts out (no 500)."""
    import json

    steer = [{"type": "control", "vector": "v", "alpha": 3}]
    with client(tmp_path, bundle) as c:
        assert c.post("/v1/control-vectors", json={"name": "v", "pairs": PAIRS}).status_code == 201
        before = generate(c, steer).json()["token_ids"]
    meta_path = tmp_path / "control-vectors" / "v.json"
    record = json.loads(meta_path.read_text())
    record["meta"]["info"] = {**record["meta"].get("info", {}), "pairs": "many",
                              "separation": {"oops": 1}}
    meta_path.write_text(json.dumps(record))
    with client(tmp_path, bundle) as c:
        card = c.get("/v1/control-vectors/v")
        assert card.status_code == 200, card.text
        body = card.json()
        assert "pairs" not in body and "separation" not in body
        assert body["source"] == "extracted" and body["sha256"] == record["sha256"]
        assert c.get("/v1/control-vectors").status_code == 200
        assert generate(c, steer).json()["token_ids"] == before
