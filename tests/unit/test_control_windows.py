"""Token windows, strength schedules, directional ablation and steering receipts, checked
against an independent reference: an uncached forward whose own hooks implement the
documented formulas in float64 position by position (no code shared with
``processors.control``), on the tiny random Llama model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from processors.base import ModelGeometry, ParamError, ProcessorEnv
from processors.control import ControlProcessor, ControlVector, apply_layer, build_phase
from processors.stack import parse_stack
from server.engine import Engine, GenerationRequest, SamplingParams
from server.engine.hooks import ControlHooks
from server.tiny import tiny_model
from tests.conftest import run_together

SEED = 5
LAYERS = 3
D = 32
N = 9


def _vector(name: str, seed: int, scale: float, layers: tuple[int, ...]) -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector(
        name, {k: (scale * rng.standard_normal(D)).astype(np.float32) for k in layers}
    )


VECTORS = {"a": _vector("a", 1, 1.0, (0, 1, 2)), "b": _vector("b", 2, 1.5, (1, 2))}
ENV = ProcessorEnv(
    vocab_size=259,
    control_vectors=VECTORS,
    geometry=ModelGeometry(num_layers=LAYERS, hidden_size=D),
)


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Engine, Any]]:
    model, tok = tiny_model(seed=SEED, num_hidden_layers=LAYERS)
    engine = Engine(model, tok)
    engine.start()
    yield engine, tok
    engine.stop()


def req(tok: Any, prompt: str, steering: list[dict[str, Any]], n: int = N) -> GenerationRequest:
    return GenerationRequest(
        request_id="r",
        prompt_ids=tuple(tok(prompt)["input_ids"]),
        sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
        steering=parse_stack(steering, ENV, max_len=4),
    )


# ------------------------------------------------------------------ the reference
def _coef(e: dict[str, Any], t: int | None) -> float:
    """The entry's coefficient at generated index ``t`` (None = a prompt position)."""
    mode = e.get("mode", "add")
    if mode == "ablate":
        return float(e.get("strength", 1.0))
    if mode == "clamp":
        return 1.0
    a = e.get("alpha", 1.0)
    if not isinstance(a, dict):
        return float(a)
    if t is None:
        return float(a["start"])
    p = min(t / a["over"], 1.0)
    shape = a.get("shape", "linear")
    if shape == "cosine":
        w = 0.5 - 0.5 * math.cos(math.pi * p)
    elif shape == "exp":
        w = (1 - math.exp(-5 * p)) / (1 - math.exp(-5))
    else:
        w = p
    return a["start"] + (a["end"] - a["start"]) * w


def _acts(e: dict[str, Any], t: int | None) -> bool:
    pos = e.get("positions", "all")
    if isinstance(pos, str):
        return pos == "all" or (pos == "prompt") == (t is None)
    if t is None:
        return False
    return pos["from"] <= t < pos.get("to", 10**9)


def reference(
    model: Any, prompt: list[int], entries: list[dict[str, Any]], n: int
) -> tuple[list[int], dict[tuple[int, int], list[tuple[float, float]]]]:
    """Greedy tokens and, per (entry, layer), ``(‖Δ‖/‖h‖, |h·û|/‖h‖)`` at every acted
    position of the final forward (prompt + generated[:-1], as the engine feeds them)."""
    P = len(prompt)
    seen: dict[tuple[int, int], list[tuple[float, float]]] = {}
    order = [k for k, e in enumerate(entries) if e.get("mode", "add") != "add"] + [
        k for k, e in enumerate(entries) if e.get("mode", "add") == "add"]

    def hook(layer: int, module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        h = out[0].double()  # (T, D), batch of one
        new = h.clone()
        for pos in range(h.shape[0]):
            t = None if pos < P else pos - P
            x = h[pos].clone()
            for k in order:
                e = entries[k]
                vec = VECTORS[e["vector"]].directions
                if layer not in e.get("layers", sorted(vec)) or not _acts(e, t):
                    continue
                v = torch.from_numpy(vec[layer]).double()
                c = _coef(e, t)
                before = x.clone()
                if e.get("mode", "add") == "add":
                    x = x + c * v
                    if e.get("preserve_norm"):
                        x = x * before.norm() / x.norm()
                    comp = math.nan
                else:
                    u = v / v.norm()
                    p = float(x @ u)
                    target = e["value"] if e["mode"] == "clamp" else (1 - c) * p
                    x = x + (target - p) * u
                    comp = abs(p) / float(before.norm())
                seen.setdefault((k, layer), []).append(
                    (float((x - before).norm() / before.norm()), comp))
            new[pos] = x
        return new.float().unsqueeze(0)

    handles = [model.model.layers[i].register_forward_hook(
        lambda m, a, o, i=i: hook(i, m, a, o)) for i in range(LAYERS)]
    try:
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(n):
                seen.clear()
                x = torch.tensor([ids])
                logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
                ids.append(int(logits[0, -1].argmax()))
            seen.clear()  # the engine never feeds the last token: recompute without it
            x = torch.tensor([ids[:-1]])
            model(input_ids=x, attention_mask=torch.ones_like(x))
    finally:
        for hd in handles:
            hd.remove()
    return ids[P:], dict(seen)


def check_receipt(receipt: dict[str, Any], entries: list[dict[str, Any]], prompt_len: int,
                  seen: dict[tuple[int, int], list[tuple[float, float]]], n: int) -> None:
    """The engine's receipt equals the reference's counts, means and maxima."""
    assert [e["index"] for e in receipt["entries"]] == list(range(len(entries)))
    for k, (e, got) in enumerate(zip(entries, receipt["entries"], strict=True)):
        prompt_n = prompt_len if _acts(e, None) else 0
        gen_n = sum(_acts(e, t) for t in range(n - 1))
        assert (got["prompt_positions"], got["generated_positions"]) == (prompt_n, gen_n), k
        layers = e.get("layers", sorted(VECTORS[e["vector"]].directions))
        assert got["layers"] == layers
        for layer in layers:
            row = got["per_layer"][str(layer)]
            vals = seen.get((k, layer), [])
            assert len(vals) == prompt_n + gen_n
            if not vals:
                assert row["delta_mean"] is None and row["delta_max"] is None
                continue
            d = [v[0] for v in vals]
            assert row["delta_mean"] == pytest.approx(sum(d) / len(d), rel=1e-3, abs=1e-6)
            assert row["delta_max"] == pytest.approx(max(d), rel=1e-3, abs=1e-6)
            if e.get("mode", "add") != "add":
                c = [v[1] for v in vals]
                assert row["component_mean"] == pytest.approx(sum(c) / len(c), rel=1e-3,
                                                              abs=1e-6)
                assert row["component_max"] == pytest.approx(max(c), rel=1e-3, abs=1e-6)
            else:
                assert "component_mean" not in row


CASES: list[tuple[str, list[dict[str, Any]]]] = [
    ("Hello there", [{"type": "control", "vector": "a", "layers": [0, 2],
                      "alpha": {"start": 3.0, "end": -1.0, "over": 4}}]),
    ("The cat sat", [{"type": "control", "vector": "b", "mode": "ablate",
                      "positions": {"from": 2}}]),
    ("Hello there", [{"type": "control", "vector": "b", "alpha": 2.0, "layers": [1],
                      "preserve_norm": True},
                     {"type": "control", "vector": "a", "mode": "clamp", "value": 0.5,
                      "layers": [1], "positions": "generated"}]),
    ("The cat sat", [{"type": "control", "vector": "a", "preserve_norm": True,
                      "alpha": {"start": 0.0, "end": 2.0, "over": 5, "shape": "exp"},
                      "positions": {"from": 1, "to": 4}},
                     {"type": "control", "vector": "b", "alpha": -1.0}]),
    ("Hello there", []),
    ("A", [{"type": "control", "vector": "a", "mode": "ablate", "strength": 0.5,
            "positions": "prompt"},
           {"type": "control", "vector": "b", "positions": "all",
            "alpha": {"start": 1.0, "end": 3.0, "over": 3, "shape": "cosine"}}]),
]


def test_windows_schedules_modes_match_the_reference_and_batch_equals_solo(
    setup: tuple[Engine, Any],
) -> None:
    engine, tok = setup
    reqs = [req(tok, p, s) for p, s in CASES]
    solo = [run_together(engine, [r])[0] for r in reqs]
    plain = solo[4][0]
    for (prompt, entries), r, (toks, fin) in zip(CASES, reqs, solo, strict=True):
        body = [{k: v for k, v in e.items() if k != "type"} for e in entries]
        want, seen = reference(engine.model, list(r.prompt_ids), body, N)
        assert toks == want, (prompt, entries)
        if not entries:
            assert fin.receipt is None
            continue
        check_receipt(fin.receipt, body, len(r.prompt_ids), seen, N)
        if prompt == "Hello there":
            assert toks != plain  # every steered case changes something
    order = [3, 0, 5, 4, 2, 1]  # shuffled: rows sit at other batch positions
    batched = run_together(engine, [reqs[i] for i in order])
    for pos, i in enumerate(order):
        toks, fin = batched[pos]
        assert toks == solo[i][0], f"case {i} differs in the batch"
        if fin.receipt is None:
            assert solo[i][1].receipt is None
            continue
        for got, ref in zip(fin.receipt["entries"], solo[i][1].receipt["entries"], strict=True):
            assert got["prompt_positions"] == ref["prompt_positions"]
            assert got["generated_positions"] == ref["generated_positions"]
            for layer, row in got["per_layer"].items():
                for key, val in row.items():
                    assert val == pytest.approx(ref["per_layer"][layer][key], rel=1e-4)


def test_after_marker_starts_at_the_token_that_completes_it(setup: tuple[Engine, Any]) -> None:
    """``{"after": TEXT}`` equals the window ``{"from": i}`` where generated token ``i`` is
    the first whose text completes TEXT (found here with the tokenizer alone)."""
    engine, tok = setup
    plain, _ = run_together(engine, [req(tok, "Hello there", [], n=12)])[0]
    texts = [tok.decode(plain[: i + 1]) for i in range(len(plain))]
    # A printable ASCII character that first appears at generated token 2..8.
    hit = next((i, ch) for i in range(2, 9) for ch in texts[i]
               if ch.isascii() and ch.isprintable() and ch not in texts[i - 1])
    i, marker = hit
    after = [{"type": "control", "vector": "a", "alpha": 3.0, "positions": {"after": marker}}]
    same = [{"type": "control", "vector": "a", "alpha": 3.0, "positions": {"from": i}}]
    (ta, fa), (tf, ff), (tp, _) = run_together(
        engine, [req(tok, "Hello there", after, 12), req(tok, "Hello there", same, 12),
                 req(tok, "Hello there", [], 12)])
    assert ta == tf and tp == plain
    assert ta[: i + 1] == plain[: i + 1] and ta != plain
    assert fa.receipt["entries"][0]["generated_positions"] == 12 - 1 - i
    assert fa.receipt["entries"][0]["positions"] == {"after": marker}
    for layer, row in fa.receipt["entries"][0]["per_layer"].items():
        want = ff.receipt["entries"][0]["per_layer"][layer]
        assert row == pytest.approx(want, rel=1e-4)  # two rows of one batch


def test_ablation_zeroes_the_projection_in_hidden_states(setup: tuple[Engine, Any]) -> None:
    """Strength 1 leaves no component along û at the touched blocks (read back with
    ``output_hidden_states``); an untouched block keeps its component."""
    engine, tok = setup
    spec = ControlProcessor.validate({"vector": "a", "mode": "ablate", "layers": [0, 1]}, ENV)
    ids = torch.tensor([tok("The cat sat on the mat")["input_ids"]])
    mask = torch.ones_like(ids)
    phase = build_phase([(spec,)], "prompt", torch.device("cpu"))
    hooks = ControlHooks.install(engine.model)
    with torch.inference_mode():
        plain = engine.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with hooks.steering(phase, mask):
            out = engine.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for layer in (0, 1, 2):
        v = torch.from_numpy(VECTORS["a"].directions[layer]).double()
        u = v / v.norm()
        h, h0 = out.hidden_states[layer + 1][0].double(), plain.hidden_states[layer + 1][0]
        rel = (h @ u).abs() / h.norm(dim=-1)
        if layer < 2:
            assert float(rel.max()) < 1e-6, layer
        else:  # block 2 is untouched (and is also the final-norm output): not zero
            assert float(((h0.double() @ u).abs() / h0.double().norm(dim=-1)).min()) > 1e-3
            assert float(rel.min()) > 1e-3


# ------------------------------------------------------------------ composition, dtype
def _spec(**params: Any) -> Any:
    return ControlProcessor.validate(params, ENV)


def _run_layer(specs: list[Any], h: torch.Tensor, layer: int = 1) -> torch.Tensor:
    phase = build_phase([tuple(specs)] * h.shape[0], "prompt", torch.device("cpu"))
    assert phase is not None
    phase.begin(torch.ones(h.shape[:2], dtype=torch.long))
    return apply_layer(phase, layer, h)


def test_composition_ablations_first_then_additions_each_with_its_own_norm() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 4, D, dtype=torch.float64).float() * 3
    v = torch.from_numpy(VECTORS["a"].directions[1]).double()
    w = torch.from_numpy(VECTORS["b"].directions[1]).double()
    u = v / v.norm()
    x = h.double()
    # Listed add first, ablate second: the ablation still runs first, so the added 2v
    # survives in full along û.
    got = _run_layer([_spec(vector="a", alpha=2.0, layers=[1]),
                      _spec(vector="a", mode="ablate", layers=[1])], h).double()
    ablated = x - (x @ u).unsqueeze(-1) * u
    want = ablated + 2 * v
    assert torch.allclose(got, want, atol=1e-5)
    other = (x + 2 * v) - ((x + 2 * v) @ u).unsqueeze(-1) * u  # the other order
    assert not torch.allclose(got, other, atol=1e-2)
    # preserve_norm on the first addition only: the second one is added unscaled.
    got = _run_layer([_spec(vector="a", alpha=1.0, layers=[1], preserve_norm=True),
                      _spec(vector="b", alpha=2.0, layers=[1])], h).double()
    y = x + v
    y = y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True))
    assert torch.allclose(got, y + 2 * w, atol=1e-5)
    whole = (x + v + 2 * w)  # the old behaviour: one rescale of the summed delta
    whole = whole * (x.norm(dim=-1, keepdim=True) / whole.norm(dim=-1, keepdim=True))
    assert not torch.allclose(got, whole, atol=1e-2)
    # clamp sets the projection exactly to `value`.
    got = _run_layer([_spec(vector="a", mode="clamp", value=-4.0, layers=[1])], h).double()
    assert torch.allclose(got @ u, torch.full((2, 4), -4.0, dtype=torch.float64), atol=1e-5)


def test_deltas_accumulate_in_float32_and_are_added_once() -> None:
    torch.manual_seed(1)
    h = (torch.randn(3, 2, D) * 5).to(torch.bfloat16)
    specs = [_spec(vector="a", alpha=0.37, layers=[1]), _spec(vector="b", alpha=-1.13,
                                                              layers=[1])]
    got = _run_layer(specs, h)
    a = torch.from_numpy(VECTORS["a"].directions[1])
    b = torch.from_numpy(VECTORS["b"].directions[1])
    delta32 = torch.tensor(0.37, dtype=torch.float32) * a + torch.tensor(-1.13) * b
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, h + delta32.to(torch.bfloat16))


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"alpha": {"start": 1, "end": 0}}, "alpha.over"),
        ({"alpha": {"start": 1, "end": 0, "over": 0}}, "alpha.over"),
        ({"alpha": {"start": 1, "end": 0, "over": 2.5}}, "alpha.over"),
        ({"alpha": {"start": 1, "end": 200, "over": 3}}, "alpha.end"),
        ({"alpha": {"start": "x", "end": 0, "over": 3}}, "alpha.start"),
        ({"alpha": {"start": 1, "end": 0, "over": 3, "shape": "sine"}}, "alpha.shape"),
        ({"alpha": {"start": 1, "end": 0, "over": 3, "speed": 1}}, "alpha.speed"),
        ({"alpha": {"start": 1, "end": 0, "over": 3}, "positions": "prompt"}, "alpha"),
        ({"positions": {"from": -1}}, "positions.from"),
        ({"positions": {"from": 3, "to": 3}}, "positions.to"),
        ({"positions": {"to": 3}}, "positions.from"),
        ({"positions": {"from": 1, "until": 3}}, "positions.until"),
        ({"positions": {"after": ""}}, "positions.after"),
        ({"positions": {"after": 5}}, "positions.after"),
        ({"positions": ["all"]}, "positions"),
        ({"mode": "erase"}, "mode"),
        ({"mode": "ablate", "strength": 1.5}, "strength"),
        ({"mode": "ablate", "alpha": 1.0}, "alpha"),
        ({"mode": "ablate", "preserve_norm": True}, "preserve_norm"),
        ({"mode": "clamp"}, "value"),
        ({"mode": "clamp", "value": float("inf")}, "value"),
        ({"strength": 0.5}, "strength"),
    ],
)
def test_validation_names_the_field(params: dict[str, Any], param: str) -> None:
    with pytest.raises(ParamError) as err:
        ControlProcessor.validate({"vector": "a", **params}, ENV)
    assert err.value.param == param and err.value.status == 400


def test_parse_stack_prefixes_nested_fields() -> None:
    with pytest.raises(ParamError) as err:
        parse_stack([{"type": "control", "vector": "a",
                      "alpha": {"start": 1, "end": 0, "over": -2}}], ENV, max_len=4)
    assert err.value.param == "steering.0.alpha.over"
