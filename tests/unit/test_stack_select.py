"""Rows leaving: ``ProcessorStack.select`` / ``Sampler.select`` (per-row tables indexed on
the device, no upload) must give what a fresh build for the kept rows gives.

Oracles: the same stack built from scratch (``update_state``) for the kept rows, and each
kept row's own stack run solo (the mixed-batch == solo pattern); in the engine, every
row of a batch whose rows leave at different steps equals its solo run.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from processors.base import ProcessorEnv, RowSlots, StepContext
from processors.ngram import NgramPrior
from processors.stack import ProcessorStack, parse_stack
from server.engine import Engine
from server.engine.sampler import Sampler, SamplerRow, make_generator
from server.engine.types import SamplingParams
from server.tiny import tiny_model
from tests.conftest import make_request, run_together

V = 32
DOCS = [[1, 2, 3, 1, 2, 4, 5, 1, 2, 3, 6], [7, 1, 2, 8, 3, 1, 9, 2, 3]]


def env() -> ProcessorEnv:
    priors = {
        "jm": NgramPrior.build("jm", DOCS, V),
        "kn": NgramPrior.build("kn", DOCS, V, estimator="kneser_ney"),
    }
    return ProcessorEnv(vocab_size=V, priors=priors)


def rows_of(e: ProcessorEnv) -> list[list[dict[str, Any]]]:
    """Nine rows: every processor with select, in different stage positions, mixed with
    unsteered rows, λ = 0, z-score, a second prior and a ban."""
    ng = {"type": "ngram", "prior": "jm", "lambda": 0.7}
    return [
        [ng, {"type": "margin", "tau": 0.2}],
        [],
        [{"type": "logit_bias", "bias": {"3": 2.5, "5": -100}}],
        [{**ng, "prior": "kn", "scale": "zscore"}],
        [{"type": "logit_bias", "bias": {"4": 1.0}}, {"type": "margin", "tau": 0.3}],
        [{**ng, "lambda": 0.0}],
        [{**ng, "scale": "zscore"}, {"type": "guard", "plausibility": 0.05}],
        [],
        [{"type": "guard", "kl_budget": 0.3}, {"type": "margin", "tau": 0.1, "gamma": 0.5}],
    ]


def build(e: ProcessorEnv, rows: list[list[dict[str, Any]]]) -> ProcessorStack:
    stack = ProcessorStack(torch.device("cpu"), V)
    stack.update_state([parse_stack(r, e, max_len=4) for r in rows])
    return stack


def run(stack: ProcessorStack, base: torch.Tensor, last: torch.Tensor,
        want_stats: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ctx = StepContext(base_logits=base, last_tokens=last, want_stats=want_stats)
    return stack.apply(ctx, base), ctx.stats


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN where NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("keep", [[0, 2, 3, 5, 6, 8], [1, 7], [8, 4, 0], [3], [6, 2]])
@pytest.mark.parametrize("want_stats", [False, True])
def test_stack_select_equals_fresh_build_and_solo(keep: list[int], want_stats: bool) -> None:
    e = env()
    rows = rows_of(e)
    gen = torch.Generator().manual_seed(len(keep))
    base = torch.randn(len(rows), V, generator=gen) * 3
    base[::3, 2] += 6.0  # some rows confident (margin acts)
    last = torch.randint(0, 10, (len(rows), 2), generator=gen)
    last[1, 0] = -1
    stack = build(e, rows)
    run(stack, base, last, want_stats)  # the batch ran before the rows left
    stack.select(keep, torch.tensor(keep))
    kept = [rows[b] for b in keep]
    out, stats = run(stack, base[keep], last[keep], want_stats)
    fresh_out, fresh_stats = run(build(e, kept), base[keep], last[keep], want_stats)
    assert torch.equal(out, fresh_out)
    assert sorted(stats) == sorted(fresh_stats)
    for k in stats:
        assert same(stats[k], fresh_stats[k]), k
    fresh = build(e, kept)
    assert (stack.bans is None) == (fresh.bans is None)
    if stack.bans is not None and fresh.bans is not None:
        assert Counter(zip(*(t.tolist() for t in stack.bans), strict=True)) == \
            Counter(zip(*(t.tolist() for t in fresh.bans), strict=True))
    for j, b in enumerate(keep):  # each kept row equals its own stack run solo
        solo, _ = run(build(e, [rows[b]]), base[b : b + 1], last[b : b + 1], want_stats)
        torch.testing.assert_close(out[j : j + 1], solo, rtol=0, atol=1e-5)
        if not rows[b]:
            assert torch.equal(out[j], base[b])  # unsteered rows untouched


def test_select_twice_and_to_no_user() -> None:
    """Two leaves in a row compose; a processor whose rows all left is dropped."""
    e = env()
    rows = rows_of(e)
    base = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(5))
    last = torch.randint(0, 10, (len(rows), 2), generator=torch.Generator().manual_seed(6))
    stack = build(e, rows)
    stack.select([0, 1, 3, 4, 7, 8], torch.tensor([0, 1, 3, 4, 7, 8]))
    stack.select([1, 4, 5], torch.tensor([1, 4, 5]))  # old rows 1, 7, 8
    out, _ = run(stack, base[[1, 7, 8]], last[[1, 7, 8]], True)
    fresh, _ = run(build(e, [rows[1], rows[7], rows[8]]), base[[1, 7, 8]], last[[1, 7, 8]], True)
    assert torch.equal(out, fresh)
    assert {p.type_name for p in stack.processors()} == {"guard", "margin"}


def test_row_slots_follow_the_kept_rows() -> None:
    """RowSlots.select against the index arithmetic done by hand on the host."""
    used = [True, False, True, True, False, True]
    slots = RowSlots(used, torch.device("cpu"))
    assert slots.index is not None and slots.index.tolist() == [0, 2, 3, 5]
    keep = [5, 1, 2, 4]
    sel = slots.select(keep, torch.tensor(keep))
    old_pos = {b: j for j, b in enumerate(b for b, u in enumerate(used) if u)}
    want_rows = [i for i, b in enumerate(keep) if used[b]]
    assert sel.tolist() == [old_pos[keep[i]] for i in want_rows]
    assert slots.index is not None and slots.index.tolist() == want_rows
    assert slots.pos.tolist() == [want_rows.index(i) if i in want_rows else -1
                                  for i in range(len(keep))]
    slots.select([0, 2], torch.tensor([0, 2]))  # both used: no gather needed
    assert slots.all_rows and slots.index is None


def test_sampler_select_equals_fresh_build() -> None:
    """Temperature, top-k/p, min-p, penalties with counts, EOS blocking: the selected
    sampler draws what a fresh one for the kept rows draws."""
    P = SamplingParams
    params = [
        P(temperature=0.8, top_k=5), P(temperature=0.0), P(temperature=1.1, top_p=0.7,
                                                            presence_penalty=0.5),
        P(temperature=0.9, min_p=0.1, frequency_penalty=0.3), P(temperature=0.0, min_tokens=4),
        P(temperature=1.0, repetition_penalty=1.3),
    ]
    eos = [0]

    def rows(seed: int) -> list[SamplerRow]:
        return [SamplerRow(p, None if p.greedy else make_generator(seed + b, torch.device("cpu")),
                           0) for b, p in enumerate(params)]

    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(1)) * 2
    logits[:, 0] += 3.0  # EOS likely
    seen = torch.rand(len(params), V, generator=torch.Generator().manual_seed(2)) < 0.3
    keep = [0, 2, 3, 4]
    a = Sampler(torch.device("cpu"), V, eos)
    a_rows = rows(10)
    a.update_state(a_rows)
    warm = [a.sample(logits, seen).tolist() for _ in range(3)]  # counts, generators move
    a.select(keep, torch.tensor(keep))
    # The fresh sampler gets the same rows (generators and counts in the same state).
    b = Sampler(torch.device("cpu"), V, eos)
    b_rows = rows(10)
    b.update_state(b_rows)
    assert [b.sample(logits, seen).tolist() for _ in range(3)] == warm
    b.update_state([b_rows[i] for i in keep])
    for _ in range(4):
        ta = a.sample(logits[keep], seen[keep])
        tb = b.sample(logits[keep], seen[keep])
        assert torch.equal(ta, tb)
        for r in a.rows + b.rows:
            r.generated += 1


def test_engine_rows_leaving_at_different_steps_equal_solo() -> None:
    """Every steering method with a select, sampled and greedy rows, rows ending at
    different steps (each leave indexes the tables on the device): each row equals its
    solo run."""
    model, tok = tiny_model(seed=3)
    Vt = model.config.vocab_size
    docs = [tok(x, add_special_tokens=False)["input_ids"] for x in
            ["And the king spake unto the people, saying.", "Blessed are the meek."]]
    e = ProcessorEnv(vocab_size=Vt, priors={"p": NgramPrior.build("p", docs, Vt)})
    ng = {"type": "ngram", "prior": "p", "lambda": 0.8}
    cases: list[tuple[list[dict[str, Any]], dict[str, Any]]] = [
        ([ng, {"type": "margin", "tau": 0.05}], dict(temperature=0)),
        ([], dict(temperature=0.9, seed=3, presence_penalty=0.4)),
        ([{**ng, "scale": "zscore"}], dict(temperature=0.8, seed=4, top_k=20)),
        ([{"type": "logit_bias", "bias": {"5": 3.0, "9": -100}}], dict(temperature=0)),
        ([{"type": "guard", "plausibility": 0.01}, {"type": "margin"}],
         dict(temperature=1.0, seed=5, repetition_penalty=1.2)),
        ([{**ng, "lambda": 0.0}], dict(temperature=0, frequency_penalty=0.2)),
    ]
    reqs = [
        make_request(tok, f"prompt number {i}", rid=f"x{i}", max_tokens=3 + 2 * i,
                     ignore_eos=True, diagnostics="summary" if i % 2 else "off",
                     steering=parse_stack(s, e, max_len=4), **kw)
        for i, (s, kw) in enumerate(cases)
    ]
    engine = Engine(model, tok)
    engine.start()
    try:
        solo = [run_together(engine, [r])[0] for r in reqs]
        batched = run_together(engine, reqs)
    finally:
        engine.stop()
    for i, ((ts, fs), (tb, fb)) in enumerate(zip(solo, batched, strict=True)):
        assert tb == ts, f"row {i} differs in the batch"
        assert len(tb) == 3 + 2 * i
        if fs.diagnostics:
            for k, v in fs.diagnostics.items():
                if isinstance(v, float) and math.isfinite(v):
                    assert fb.diagnostics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("weights", [(0.2, 0.3, 0.5), (1.0, 0.0, 0.0), (1e-50, 1.0, 1.0),
                                     (1.0, 1e-30, 4.0)])
def test_jm_coefficients_table_matches_the_definition(weights: tuple[float, ...]) -> None:
    """The looked-up Jelinek–Mercer coefficients (the processor's step path) against
    c_n = w_n·[order n matched] / Σ_m w_m·[m matched], straight from the definition."""
    from processors.ngram import jm_coefficients

    table = jm_coefficients(weights)
    for pattern in range(4):
        matched = (True, bool(pattern & 1), bool(pattern & 2))
        total = sum(w for w, m in zip(weights, matched, strict=True) if m)
        c = [w / total if m else 0.0 for w, m in zip(weights, matched, strict=True)]
        log_c1, top, *scaled = table[5 * pattern : 5 * pattern + 5]
        assert log_c1 == pytest.approx(math.log(c[0]), rel=1e-12)
        assert math.exp(top) == pytest.approx(max(c), rel=1e-12)
        for got, want in zip(scaled, c, strict=True):
            assert got == pytest.approx(want / max(c), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("weights", [(0.2, 0.3, 0.5), (1e-50, 1.0, 1.0)])
def test_jm_row_is_bit_equal_with_or_without_a_kneser_ney_row(
    weights: tuple[float, ...],
) -> None:
    """A Jelinek–Mercer row's steered logits do not depend on whether a Kneser–Ney row
    shares the batch (a row's arithmetic never depends on the other rows)."""
    e = env()
    jm = {"type": "ngram", "prior": "jm", "lambda": 0.7, "weights": list(weights)}
    kn = {"type": "ngram", "prior": "kn", "lambda": 0.4}
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, V, generator=gen) * 3
    for last in ([1, 2], [-1, 2], [-1, -1], [9, 9]):  # trigram, bigram, none, unseen
        lt = torch.tensor([last, [2, 3]], dtype=torch.long)
        alone, _ = run(build(e, [[jm]]), base[:1].clone(), lt[:1], False)
        mixed, _ = run(build(e, [[jm], [kn]]), base.clone(), lt, False)
        assert same(mixed[:1], alone), last
