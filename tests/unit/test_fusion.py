"""Logit fusion: the grid search against an independent float64 oracle, validation, and the
auxiliary models inside the engine (static α = 0 / α = 1 by hand, mixed batches, no aux
forward without fusion, cache release, vocabulary check)."""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from processors.base import ParamError, ProcessorEnv, StepContext
from processors.fusion import LogitFusion, dynamic_fusion
from processors.stack import ProcessorStack, parse_stack
from server.auxiliary import AuxBundle, AuxModelError, check_aux
from server.engine import Engine, FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from server.loading import ModelBundle
from server.tiny import tiny_config, tiny_model, tiny_tokenizer
from tests.conftest import probe

ROLES = {"small": "small_base", "small2": "small_base", "e1": "expert", "e2": "expert"}
ENV = ProcessorEnv(vocab_size=16, aux_roles=ROLES)


# ----------------------------------------------------------------- reference math
def _kl64(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _softmax64(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _logsoftmax64(x: list[float]) -> list[float]:
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def documented_grid(lo: float, hi: float, step: float) -> list[float]:
    """docs/fusion.md: α runs from ``min`` to ``max`` in steps of ``step`` (both ends in)."""
    out, k = [], 0
    while lo + k * step <= hi + 1e-9 * step:
        out.append(lo + k * step)
        k += 1
    return out


def brute_force(
    strong: list[float], small: list[float], experts: list[list[float]], grid: list[float]
) -> tuple[int, float, float, list[float]]:
    """(t*, α*, J*, fused) from the documented objective, by plain float64 loops.

    For each expert t (the others at α = 0) and each grid α: build the candidate
    ``M_L + α(M_t − M_S)``, normalize it with a full softmax, and evaluate
    ``J = (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²`` with every KL summed term by
    term over the vocabulary. It shares nothing with the implementation, which avoids
    the (B, T·G, V) log-softmax through the identity KL(P‖P̃) = lse − α·E_P[d]; this
    oracle does not use it. Ties go to the first (t, α) in loop order, as documented.
    """
    ml, ms = _logsoftmax64(strong), _logsoftmax64(small)
    p, q = _softmax64(ml), _softmax64(ms)
    best: tuple[float, int, float, list[float]] | None = None
    for t, ex in enumerate(experts):
        mt = _logsoftmax64(ex)
        qt = _softmax64(mt)
        target_fwd, target_rev = _kl64(qt, q), _kl64(q, qt)
        for a in grid:
            fused = [ml[v] + a * (mt[v] - ms[v]) for v in range(len(ml))]
            pt = _softmax64(fused)
            j = (_kl64(pt, p) - target_fwd) ** 2 + (_kl64(p, pt) - target_rev) ** 2
            if best is None or j < best[0]:
                best = (j, t, a, fused)
    assert best is not None
    return best[1], best[2], best[0], best[3]


def _run_processor(
    specs: list[Any], strong: torch.Tensor, aux: dict[str, torch.Tensor], stats: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    B, V = strong.shape
    proc = LogitFusion(torch.device("cpu"), V)
    proc.update_state(specs)
    ctx = StepContext(base_logits=strong, last_tokens=torch.full((B, 2), -1), want_stats=stats,
                      aux_logits=aux)
    return proc.apply(ctx, strong.clone()), ctx.stats


def test_grid_search_matches_float64_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    B, V = 9, 16
    strong = torch.randn(B, V, generator=gen) * 2
    aux = {n: torch.randn(B, V, generator=gen) * 2 for n in ROLES}
    entries = [
        {"experts": ["e1"], "base": "small"},
        {"experts": ["e1", "e2"], "base": "small"},
        {"experts": ["e2"], "base": "small2", "grid": {"max": 3.0, "step": 0.25}},
        None,
        {"experts": ["e2", "e1"], "base": "small2", "grid": {"max": 1.0, "step": 0.5}},
        {"experts": ["e1"], "base": "small", "mode": "static", "alpha": [0.7]},
        {"experts": ["e1", "e2"], "base": "small", "grid": {"max": 0.0, "step": 0.1}},
        {"experts": ["e1", "e2"], "base": "small", "grid": {"min": -1.5, "max": 0.5, "step": 0.25}},
        {"experts": ["e2"], "base": "small2", "grid": {"min": -2.0, "max": -0.5, "step": 0.5}},
    ]
    specs = [None if e is None else LogitFusion.validate(e, ENV) for e in entries]
    out, stats = _run_processor(specs, strong, aux)
    for b, spec in enumerate(specs):
        if spec is None:
            assert torch.equal(out[b], strong[b])
            assert math.isnan(stats["fusion_alpha"][b])
            continue
        if spec.mode == "static":
            ml, ms, mt = (torch.log_softmax(x[b].double(), -1)
                          for x in (strong, aux["small"], aux["e1"]))
            torch.testing.assert_close(out[b].double(), ml + 0.7 * (mt - ms), atol=1e-5, rtol=0)
            assert math.isnan(stats["fusion_alpha"][b])
            continue
        t, a, j, fused = brute_force(
            strong[b].double().tolist(), aux[spec.base][b].double().tolist(),
            [aux[e][b].double().tolist() for e in spec.experts],
            documented_grid(spec.grid_min, spec.grid_max, spec.grid_step),
        )
        assert int(stats["fusion_expert"][b]) == t, f"row {b}"
        assert float(stats["fusion_alpha"][b]) == pytest.approx(a, abs=1e-6)
        assert float(stats["fusion_objective"][b]) == pytest.approx(j, rel=1e-3, abs=1e-6)
        torch.testing.assert_close(out[b].double(), torch.tensor(fused, dtype=torch.float64),
                                   atol=1e-4, rtol=0)


def test_grid_search_random_cases_against_brute_force() -> None:
    """Many small random problems: the chosen candidate is the float64 optimum wherever
    that optimum is clear (gap > 1e-5); otherwise its objective is within 1e-5."""
    gen = torch.Generator().manual_seed(1)
    spec = LogitFusion.validate({"experts": ["e1", "e2"], "base": "small"}, ENV)
    B, V = 64, 8
    strong = torch.randn(B, V, generator=gen) * 3
    aux = {n: torch.randn(B, V, generator=gen) * 3 for n in ROLES}
    _, stats = _run_processor([spec] * B, strong, aux)
    for b in range(B):
        t, a, j, _ = brute_force(strong[b].tolist(), aux["small"][b].tolist(),
                                 [aux["e1"][b].tolist(), aux["e2"][b].tolist()],
                                 documented_grid(0.0, 2.0, 0.1))
        got_t, got_a = int(stats["fusion_expert"][b]), float(stats["fusion_alpha"][b])
        if (got_t, round(got_a, 6)) != (t, round(a, 6)):
            # recompute the objective of the chosen candidate in float64
            _, _, j_got, _ = brute_force(strong[b].tolist(), aux["small"][b].tolist(),
                                         [[aux["e1"], aux["e2"]][got_t][b].tolist()], [got_a])
            assert j_got - j < 1e-5, f"row {b}: chose ({got_t}, {got_a}), best ({t}, {a})"


def test_chunked_grid_search_gives_the_same_results() -> None:
    """Issue 15.6: a memory budget of one grid point per chunk, or of a few, gives the
    choices and fused logits of the one-chunk evaluation (each candidate's numbers are
    computed the same way in any chunking)."""
    gen = torch.Generator().manual_seed(3)
    B, V, T, G = 5, 32, 2, 21
    m_strong = torch.log_softmax(torch.randn(B, V, generator=gen) * 2, -1)
    m_small = torch.log_softmax(torch.randn(B, V, generator=gen) * 2, -1)
    m_exp = torch.log_softmax(torch.randn(B, T, V, generator=gen) * 2, -1)
    grid = torch.linspace(-1.0, 1.0, G).view(1, 1, G).repeat(B, 1, 1)
    valid = torch.ones(B, T, G, dtype=torch.bool)
    valid[0, 1] = False
    whole = dynamic_fusion(m_strong, m_small, m_exp, grid, valid, memory_budget=2**40)
    for budget in (1, 4 * B * T * V * 3, 4 * B * T * V * 7):
        part = dynamic_fusion(m_strong, m_small, m_exp, grid, valid, memory_budget=budget)
        torch.testing.assert_close(part[0], whole[0], rtol=0, atol=1e-6)
        assert torch.equal(part[1][0], whole[1][0]) and torch.equal(part[1][1], whole[1][1])
        torch.testing.assert_close(part[1][2], whole[1][2], rtol=1e-5, atol=1e-7)


def test_memory_budget_reaches_the_processor_through_the_stack() -> None:
    stack = ProcessorStack(torch.device("cpu"), 16, options={"fusion_memory_budget": 123})
    stack.update_state([parse_stack([{"type": "fusion", "experts": ["e1"], "base": "small"}],
                                    ENV, max_len=4)])
    (proc,) = stack.processors()
    assert isinstance(proc, LogitFusion) and proc.memory_budget == 123


@pytest.mark.parametrize(
    ("params", "param", "status"),
    [
        ({"experts": ["nope"], "base": "small"}, "experts.0", 404),
        ({"experts": ["e1"], "base": "nope"}, "base", 404),
        ({"experts": ["small"], "base": "small"}, "experts.0", 400),
        ({"experts": ["e1"], "base": "e2"}, "base", 400),
        ({"experts": [], "base": "small"}, "experts", 400),
        ({"experts": ["e1", "e1"], "base": "small"}, "experts", 400),
        ({"experts": ["e1"]}, "base", 400),  # two small bases configured: must name one
        ({"experts": ["e1"], "base": "small", "mode": "x"}, "mode", 400),
        ({"experts": ["e1"], "base": "small", "mode": "static"}, "alpha", 400),
        ({"experts": ["e1"], "base": "small", "mode": "static", "alpha": [1, 2]}, "alpha", 400),
        ({"experts": ["e1"], "base": "small", "alpha": [1]}, "alpha", 400),
        ({"experts": ["e1"], "base": "small", "grid": {"step": 0}}, "grid.step", 400),
        ({"experts": ["e1"], "base": "small", "grid": {"max": -1}}, "grid.max", 400),
        ({"experts": ["e1"], "base": "small", "grid": {"max": 20, "step": 0.1}}, "grid", 400),
        ({"experts": ["e1"], "base": "small", "grid": {"min": 1, "max": 0.5}}, "grid.max", 400),
        ({"experts": ["e1"], "base": "small", "grid": {"min": -101}}, "grid.min", 400),
        ({"experts": ["e1"], "base": "small", "grid": {"min": 10**400}}, "grid.min", 400),
        ({"experts": ["e1"], "base": "small", "grid": {"lo": 0}}, "grid.lo", 400),
        ({"experts": ["e1"], "base": "small", "lambda": 1}, "lambda", 400),
    ],
)
def test_validation(params: dict[str, Any], param: str, status: int) -> None:
    with pytest.raises(ParamError) as err:
        LogitFusion.validate(params, ENV)
    assert err.value.param == param and err.value.status == status, err.value.message


def test_validation_defaults() -> None:
    env = ProcessorEnv(16, aux_roles={"s": "small_base", "e": "expert"})
    spec = LogitFusion.validate({"experts": ["e"]}, env)
    assert spec.base == "s" and spec.mode == "dynamic" and spec.grid_points == 21
    assert LogitFusion.validate({"experts": ["e"], "grid": {"max": 10, "step": 0.1}},
                                env).grid_points == 101
    with pytest.raises(ParamError) as err:
        LogitFusion.validate({"experts": ["e"]}, ProcessorEnv(16))
    assert err.value.status == 404


# ------------------------------------------------------------------------ engine
STRONG_SEED, SMALL_SEED, E1_SEED, E2_SEED = 21, 22, 23, 24


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    strong, tok = tiny_model(STRONG_SEED, num_hidden_layers=4)
    return {
        "strong": strong,
        "tok": tok,
        "small": tiny_model(SMALL_SEED, num_hidden_layers=1)[0],
        "e1": tiny_model(E1_SEED, num_hidden_layers=1)[0],
        "e2": tiny_model(E2_SEED, num_hidden_layers=2)[0],
    }


@pytest.fixture(scope="module")
def setup(models: dict[str, Any]) -> Iterator[tuple[Engine, ProcessorEnv]]:
    aux = {k: models[k] for k in ("small", "e1", "e2")}
    engine = Engine(models["strong"], models["tok"], aux_models=aux)
    engine.start()
    env = ProcessorEnv(
        vocab_size=models["strong"].config.vocab_size,
        aux_roles={"small": "small_base", "e1": "expert", "e2": "expert"},
    )
    yield engine, env
    engine.stop()


def _req(tok: Any, env: ProcessorEnv, prompt: str, steering: list[dict[str, Any]], rid: str,
         max_tokens: int = 8, diagnostics: str = "off", **sampling: Any) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(
        request_id=rid,
        prompt_ids=tuple(tok(prompt)["input_ids"]),
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling),
        steering=parse_stack(steering, env, max_len=4),
        diagnostics=diagnostics,  # type: ignore[arg-type]
    )


def _collect(q: queue.Queue[Any]) -> tuple[list[int], FinishEvent, list[Any]]:
    tokens: list[int] = []
    lps: list[Any] = []
    while True:
        ev = q.get(timeout=60)
        if isinstance(ev, TokenEvent):
            tokens.extend(ev.token_ids)
            lps.extend(ev.logprobs or ())
        elif isinstance(ev, FinishEvent):
            return tokens, ev, lps
        else:
            raise AssertionError(f"engine error: {ev}")


def _together(engine: Engine, reqs: list[GenerationRequest]) -> list[Any]:
    queues: list[queue.Queue[Any]] = [queue.Queue() for _ in reqs]
    engine.submit_many([(r, q.put) for r, q in zip(reqs, queues, strict=True)])
    return [_collect(q) for q in queues]


def _assert_aux_released(engine: Engine) -> None:
    """The last event is sent before the engine drops the row: wait for it briefly."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(m.batch.cache is None and not m.keys for m in engine.aux.models.values()):
            return
        time.sleep(0.01)
    raise AssertionError("auxiliary rows were not released")


def _logp(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]))
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1)


def test_static_alpha_zero_equals_strong_alone(setup: tuple[Engine, ProcessorEnv],
                                               models: dict[str, Any]) -> None:
    engine, env = setup
    tok = models["tok"]
    fused = [{"type": "fusion", "experts": ["e1"], "base": "small", "mode": "static",
              "alpha": [0.0]}]
    [(plain, _, _)] = _together(engine, [_req(tok, env, "Hello there", [], "p")])
    [(zero, _, _)] = _together(engine, [_req(tok, env, "Hello there", fused, "z")])
    assert zero == plain


def test_static_alpha_one_by_hand(setup: tuple[Engine, ProcessorEnv],
                                  models: dict[str, Any]) -> None:
    """M_L + M_t − M_S from three separate full-sequence forwards (no cache)."""
    engine, env = setup
    tok = models["tok"]
    steering = [{"type": "fusion", "experts": ["e1"], "base": "small", "mode": "static",
                 "alpha": [1.0]}]
    req = _req(tok, env, "The quick", steering, "a1", max_tokens=6, logprobs=5)
    [(tokens, _, lps)] = _together(engine, [req])
    ids = list(req.prompt_ids)
    expected: list[int] = []
    for step in range(6):
        fused = (_logp(models["strong"], ids) + _logp(models["e1"], ids)
                 - _logp(models["small"], ids))
        if step == 0:  # first-step logits: the reported top-5 log-probs of the fused dist
            lp = torch.log_softmax(fused, dim=-1)
            top = lp.topk(5)
            got = lps[0].top
            assert [t for t, _ in got] == top.indices.tolist()
            for (_, v), ref in zip(got, top.values.tolist(), strict=True):
                assert v == pytest.approx(ref, abs=1e-4)
        nxt = int(fused.argmax())
        expected.append(nxt)
        ids.append(nxt)
    assert tokens == expected
    [(plain, _, _)] = _together(engine, [_req(tok, env, "The quick", [], "p", max_tokens=6)])
    assert plain != tokens  # the expert's shift changes this stream


CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    ("Hello", [{"type": "fusion", "experts": ["e1"], "base": "small"}], {}),
    ("Hello", [], {}),
    ("Once upon a time", [{"type": "fusion", "experts": ["e1", "e2"], "base": "small"}], {}),
    ("Why", [{"type": "fusion", "experts": ["e2"], "base": "small", "mode": "static",
              "alpha": [1.5]}], {"temperature": 0.8, "seed": 5}),
    ("A much longer prompt than the others", [], {"temperature": 1.0, "seed": 7}),
    ("Hello", [{"type": "logit_bias", "bias": {"70": 3.0}},
               {"type": "fusion", "experts": ["e2"], "base": "small",
                "grid": {"max": 1.0, "step": 0.25}}], {}),
]


def test_mixed_batch_equals_solo_runs(setup: tuple[Engine, ProcessorEnv],
                                      models: dict[str, Any]) -> None:
    engine, env = setup
    tok = models["tok"]
    reqs = [_req(tok, env, p, s, f"m{i}", max_tokens=8 + i, diagnostics="steps", **kw)
            for i, (p, s, kw) in enumerate(CASES)]
    solo = [_together(engine, [r])[0] for r in reqs]
    seen = probe(engine)
    batched = _together(engine, reqs)
    assert seen.peak_batch >= len(reqs)
    for i, ((t_s, f_s, _), (t_b, f_b, _)) in enumerate(zip(solo, batched, strict=True)):
        assert t_b == t_s, f"row {i} differs in the batch"
        steps_s, steps_b = f_s.diagnostics["per_step"], f_b.diagnostics["per_step"]
        if CASES[i][1] and CASES[i][1][-1].get("mode") != "static":
            assert steps_b["fusion_alpha"] == pytest.approx(steps_s["fusion_alpha"], abs=1e-6)
            assert steps_b["fusion_expert"] == steps_s["fusion_expert"]
            assert "fusion_alpha_mean" in f_b.diagnostics
        elif not CASES[i][1]:
            assert "fusion_alpha_mean" not in f_b.diagnostics
    # every auxiliary cache is released once the rows are gone
    _assert_aux_released(engine)


def test_rows_without_fusion_run_no_aux_forward(setup: tuple[Engine, ProcessorEnv],
                                                models: dict[str, Any]) -> None:
    engine, env = setup
    calls: list[str] = []
    hooks = [models[n].register_forward_pre_hook(lambda *_a, n=n: calls.append(n))
             for n in ("small", "e1", "e2")]
    try:
        _together(engine, [_req(models["tok"], env, "Hi", [], "n", max_tokens=5)])
        assert calls == []
        steering = [{"type": "fusion", "experts": ["e1"], "base": "small"}]
        _together(engine, [_req(models["tok"], env, "Hi", steering, "f", max_tokens=5)])
        # prefill + 4 decodes for each used model; e2 untouched
        assert calls.count("small") == 5 and calls.count("e1") == 5 and "e2" not in calls
    finally:
        for h in hooks:
            h.remove()


def test_cancel_releases_aux_rows(setup: tuple[Engine, ProcessorEnv],
                                  models: dict[str, Any]) -> None:
    engine, env = setup
    steering = [{"type": "fusion", "experts": ["e1"], "base": "small"}]
    q: queue.Queue[Any] = queue.Queue()
    handle = engine.submit(_req(models["tok"], env, "Hi", steering, "c", max_tokens=500), q.put)
    assert isinstance(q.get(timeout=30), TokenEvent)
    handle.cancel()
    while not isinstance(ev := q.get(timeout=30), FinishEvent):
        pass
    assert ev.finish_reason == "abort"
    _assert_aux_released(engine)


def _bundle(model: Any, tok: Any, name: str) -> ModelBundle:
    return ModelBundle(model, tok, name, f"test:{name}", 1024, 0.0, "float32", "cpu")


def test_vocabulary_mismatch_is_refused(models: dict[str, Any]) -> None:
    main = _bundle(models["strong"], models["tok"], "main")
    ok = AuxBundle("small", "small_base", _bundle(models["small"], tiny_tokenizer(), "small"))
    check_aux(main, [ok])
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])  # one more token: vocabularies differ
    bad = AuxBundle("bad", "expert", _bundle(models["e1"], other, "bad"))
    with pytest.raises(AuxModelError, match="token id 259"):
        check_aux(main, [ok, bad])
    wider = LlamaForCausalLM(tiny_config(300))
    with pytest.raises(AuxModelError, match="300 rows"):
        check_aux(main, [AuxBundle("w", "expert", _bundle(wider, tiny_tokenizer(), "w"))])
