"""Control vectors inside the engine with the tiny random model: hooks, batch isolation,
α = 0 equivalence, positions, hook hygiene and the unsteered-twin diagnostics."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from processors.base import ModelGeometry, ProcessorEnv
from processors.control import ControlProcessor, ControlVector, build_phase
from processors.metrics import entropy_from_logp, kl_from_logp
from processors.stack import parse_stack
from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.engine.hooks import ControlHooks
from server.tiny import tiny_model
from tests.conftest import run_together

SEED = 5
LAYERS = 3


def _vector(name: str, seed: int, scale: float, layers: tuple[int, ...]) -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector(
        name, {k: (scale * rng.standard_normal(32)).astype(np.float32) for k in layers}
    )


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Engine, ProcessorEnv, Any]]:
    model, tok = tiny_model(seed=SEED, num_hidden_layers=LAYERS)
    vectors = {
        "a": _vector("a", 1, 1.0, (0, 1, 2)),
        "b": _vector("b", 2, 1.5, (1, 2)),
    }
    env = ProcessorEnv(
        vocab_size=model.config.vocab_size,
        control_vectors=vectors,
        geometry=ModelGeometry(num_layers=LAYERS, hidden_size=32),
    )
    engine = Engine(model, tok)
    engine.start()
    yield engine, env, tok
    engine.stop()


def req(
    tok: Any, env: ProcessorEnv, prompt: str, steering: list[dict[str, Any]], rid: str = "r",
    diagnostics: str = "off", n: int = 10,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_ids=tuple(tok(prompt)["input_ids"]),
        sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
        steering=parse_stack(steering, env, max_len=4),
        diagnostics=diagnostics,  # type: ignore[arg-type]
    )


def reference_logits(
    model: Any, ids: list[int], add: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """``(T, V)`` logits of one uncached forward, with an independent hook adding
    ``add[ℓ] (D,)`` to block ℓ's output (a check of the layer convention)."""
    handles = []
    for layer, vec in (add or {}).items():
        handles.append(model.model.layers[layer].register_forward_hook(
            lambda m, a, out, v=vec: out + v
        ))
    try:
        with torch.inference_mode():
            x = torch.tensor([ids])
            return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
    finally:
        for h in handles:
            h.remove()


CASES: list[tuple[str, list[dict[str, Any]]]] = [
    ("Hello there", [{"type": "control", "vector": "a", "alpha": 2.0}]),
    ("Hello there", []),
    ("The cat sat", [{"type": "control", "vector": "b", "alpha": -3, "layers": [1],
                      "positions": "prompt"}]),
    ("Hello there", [{"type": "control", "vector": "a", "alpha": 2.0, "positions": "generated"}]),
    ("The cat sat", [{"type": "control", "vector": "a", "alpha": 1.5, "preserve_norm": True},
                     {"type": "logit_bias", "bias": {"70": 3.0}},
                     {"type": "control", "vector": "b", "alpha": 1.0, "layers": [2]}]),
    ("Hello there", [{"type": "control", "vector": "a", "alpha": 0.0}]),
    ("A", [{"type": "control", "vector": "b", "alpha": 2.5}]),
]


def test_mixed_batch_equals_solo_runs(setup: tuple[Engine, ProcessorEnv, Any]) -> None:
    engine, env, tok = setup
    reqs = [req(tok, env, p, s, f"r{i}") for i, (p, s) in enumerate(CASES)]
    solo = [run_together(engine, [r])[0][0] for r in reqs]
    order = [4, 1, 6, 0, 3, 5, 2]  # shuffled, so rows sit at other batch positions
    batched = run_together(engine, [reqs[i] for i in order])
    for pos, i in enumerate(order):
        assert batched[pos][0] == solo[i], f"case {i} differs in the batch"
    plain = solo[1]
    assert solo[5] == plain  # α = 0 is bit-identical to no vector
    for i in (0, 3):  # same prompt, steered → other tokens
        assert solo[i] != plain
    assert solo[0] != solo[3]  # "generated" leaves the prompt (and first token) alone
    assert solo[3][0] == plain[0]
    assert solo[2] != run_together(engine, [req(tok, env, "The cat sat", [])])[0][0]


def test_single_row_matches_an_independent_hook(setup: tuple[Engine, ProcessorEnv, Any]) -> None:
    """Greedy decoding with α·v_ℓ on block ℓ equals an uncached reference that adds the
    same vector with its own hook on ``model.model.layers[ℓ]``."""
    engine, env, tok = setup
    vec = env.control_vectors["b"]
    r = req(tok, env, "The cat sat", [{"type": "control", "vector": "b", "alpha": 2.0}], n=6)
    got = run_together(engine, [r])[0][0]
    add = {k: 2.0 * torch.from_numpy(v) for k, v in vec.directions.items()}
    ids = list(r.prompt_ids)
    for _ in range(6):
        ids.append(int(reference_logits(engine.model, ids, add)[-1].argmax()))
    assert got == ids[len(r.prompt_ids):]


def test_hooks_are_installed_once_and_free_when_unused(
    setup: tuple[Engine, ProcessorEnv, Any],
) -> None:
    engine, env, tok = setup
    hooks = ControlHooks.install(engine.model)
    assert hooks is engine.runner.hooks and len(hooks._handles) == LAYERS
    again = Engine(engine.model, tok)  # a second engine over the same model reuses them
    assert again.runner.hooks is hooks
    phases: list[Any] = []
    real = hooks.steering

    def spy(phase: Any, *a: Any, **k: Any) -> Any:
        phases.append(phase)
        return real(phase, *a, **k)

    hooks.steering = spy  # type: ignore[method-assign]
    try:
        run_together(engine, [req(tok, env, "Hello there", []), req(tok, env, "Hi", [
            {"type": "control", "vector": "a", "alpha": 0.0}])])
    finally:
        del hooks.steering
    assert phases and all(p is None for p in phases)  # no steered row: never a phase


def test_hooks_leave_nothing_behind(setup: tuple[Engine, ProcessorEnv, Any]) -> None:
    engine, env, tok = setup
    run_together(engine, [req(tok, env, p, s) for p, s in CASES[:3]])
    ids = list(tok("Hello there")["input_ids"])
    fresh, _ = tiny_model(seed=SEED, num_hidden_layers=LAYERS)  # never hooked
    hooks = engine.runner.hooks
    assert not hooks.active()
    assert torch.equal(reference_logits(engine.model, ids), reference_logits(fresh, ids))
    # An error inside a steered forward (a delta of the wrong width) clears too.
    bad = build_phase([(ControlProcessor.validate({"vector": "w31"}, ProcessorEnv(
        8, control_vectors={"w31": ControlVector("w31", {1: np.ones(31)})})),)],
        "prompt", torch.device("cpu"))
    with pytest.raises(RuntimeError), hooks.steering(bad):
        reference_logits(engine.model, ids)
    assert not hooks.active()
    assert torch.equal(reference_logits(engine.model, ids), reference_logits(fresh, ids))


def test_diagnostics_use_unsteered_twins(setup: tuple[Engine, ProcessorEnv, Any]) -> None:
    """KL(P_unsteered ‖ P_steered) and the steered entropy, from twins with their own
    cache: the first step equals a reference computed by hand, and every step's base NLL
    equals the unsteered model's NLL of the emitted token in the steered context."""
    engine, env, tok = setup
    steer = [{"type": "control", "vector": "a", "alpha": 2.0}]
    gen = [{"type": "control", "vector": "a", "alpha": 2.0, "positions": "generated"}]
    reqs = [
        req(tok, env, "Hello there", steer, "s", diagnostics="steps", n=8),
        req(tok, env, "The cat sat", [], "plain", diagnostics="summary", n=8),
        req(tok, env, "Hello there", gen, "g", diagnostics="steps", n=8),
        req(tok, env, "Hello there", steer, "nodiag", n=8),
    ]
    forwards: list[int] = []  # batch size of every main-model forward
    handle = engine.model.register_forward_pre_hook(
        lambda _m, _a, kw: forwards.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
    steps = engine.steps
    try:
        (toks, fin), (_, fin_plain), (toks_g, fin_g), (toks_nd, _) = run_together(engine, reqs)
    finally:
        handle.remove()
    # One forward per step, twins inside it: the prefill, then one decode for each step
    # but the last (all rows end together). Three rows are control-steered with
    # diagnostics or not; "s" and "g" want twins, so decodes carry 4 + 2 rows.
    assert len(forwards) == 1 + (engine.steps - steps - 1), forwards
    assert forwards[1:] == [6] * (len(forwards) - 1)
    assert toks_nd == toks  # diagnostics do not change the tokens
    vec = env.control_vectors["a"]
    add = {k: 2.0 * torch.from_numpy(v) for k, v in vec.directions.items()}
    ids = list(reqs[0].prompt_ids)
    p = torch.log_softmax(reference_logits(engine.model, ids), -1)[-1]
    q = torch.log_softmax(reference_logits(engine.model, ids, add), -1)[-1]
    d = fin.diagnostics
    assert d["kl_base_steered_first"] == pytest.approx(float(kl_from_logp(p, q)), rel=1e-3)
    assert d["entropy_steered_first"] == pytest.approx(float(entropy_from_logp(q)), rel=1e-4)
    assert d["kl_base_steered_first"] > 0.01 and d["kl_base_steered_mean"] > 0.01
    base = torch.log_softmax(reference_logits(engine.model, ids + toks), -1)
    want = [-float(base[len(ids) - 1 + j, t]) for j, t in enumerate(toks)]
    assert d["per_step"]["base_nll"] == pytest.approx(want, rel=1e-3, abs=1e-4)
    # "generated": the first token comes from the unsteered prompt (KL exactly 0 there).
    g = fin_g.diagnostics
    assert g["per_step"]["kl_base_steered"][0] == pytest.approx(0.0, abs=1e-6)
    assert g["kl_base_steered_mean"] > 0
    assert math.isclose(fin_plain.diagnostics["kl_base_steered_mean"], 0.0, abs_tol=1e-9)
    assert not engine.twins.active  # twins leave with their rows


def test_rows_leaving_keep_every_rows_deltas(
    setup: tuple[Engine, ProcessorEnv, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control rows that end at different steps: the decode phase follows the kept rows
    on the device (PhaseDeltas.select, no host rebuild) and every row still equals its
    solo run; a leave step uploads a handful of small tensors, not the phase again."""
    engine, env, tok = setup
    cases = [CASES[0], CASES[2], CASES[4], CASES[6], CASES[1]]
    reqs = [req(tok, env, p, s, f"l{i}", n=3 + 2 * i) for i, (p, s) in enumerate(cases)]
    reqs.append(req(tok, env, "Say", [{"type": "control", "vector": "b", "alpha": 1.0,
                                        "positions": {"after": "e"}}], "after", n=12))
    solo = [run_together(engine, [r])[0][0] for r in reqs]
    uploads: list[int] = []
    made = [0]
    real_tensor = torch.tensor

    def counted(*a: Any, **k: Any) -> torch.Tensor:
        made[0] += 1
        return real_tensor(*a, **k)

    real_step = engine._step

    def step() -> None:
        before, n0 = len(engine.rows), made[0]
        real_step()
        if 0 < len(engine.rows) < before:
            uploads.append(made[0] - n0)

    monkeypatch.setattr(torch, "tensor", counted)
    monkeypatch.setattr(engine, "_step", step)
    batched = run_together(engine, reqs)
    for i, (toks, _) in enumerate(batched):
        assert toks == solo[i], f"row {i} differs once others left"
    assert len(uploads) >= 4
    # Rebuilt from the host (build_phase) these leave steps upload 14-26 tensors; with
    # the phase following the rows, 4-5 (kept-row indices, sampler and bias tables).
    assert max(uploads) <= 6, uploads


def test_overlapped_decode_with_twins_equals_solo(setup: tuple[Engine, ProcessorEnv, Any]) -> None:
    """Overlap (EngineConfig.overlap) with control rows, twins (diagnostics) and an
    ``after`` row (whose steps fall back to decode-after-emit): tokens and diagnostics
    equal the plain engine's solo runs."""
    engine, env, tok = setup
    reqs = [req(tok, env, p, s, f"v{i}", diagnostics="steps", n=4 + i)
            for i, (p, s) in enumerate(CASES[:5])]
    reqs.append(req(tok, env, "Say", [{"type": "control", "vector": "b", "alpha": 1.0,
                                        "positions": {"after": "e"}}], "after", n=9))
    solo = [run_together(engine, [r])[0] for r in reqs]
    fast = Engine(engine.model, tok, EngineConfig(overlap=True))
    fast.start()
    try:
        batched = run_together(fast, reqs)
    finally:
        fast.stop()
    for i, ((t_s, f_s), (t_b, f_b)) in enumerate(zip(solo, batched, strict=True)):
        assert t_b == t_s, f"row {i} differs with overlap"
        if f_s.diagnostics is None:  # the "after" row asks for none
            continue
        for k, v in f_s.diagnostics["per_step"].items():
            assert f_b.diagnostics["per_step"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
