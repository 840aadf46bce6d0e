"""Sampler: per-row settings on hand-built logits."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampler import Sampler, SamplerRow, make_generator
from server.engine.types import SamplingParams

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _each_device(device: torch.device) -> None:
    """Every sampler test runs on each device present: ``sampler_for`` builds the
    sampler there and :class:`_OnDevice` moves the test's inputs to it."""
    _DEV[0] = device


_DEV = [CPU]


class _OnDevice(Sampler):
    """The sampler under test, on the test's device; inputs move there, tokens come
    back to the CPU (the oracles are host-side)."""

    def sample(self, logits, seen, bans=None):  # type: ignore[override]
        d = self.device
        bans = None if bans is None else (bans[0].to(d), bans[1].to(d))
        return super().sample(logits.to(d), None if seen is None else seen.to(d), bans).cpu()


def sampler_for(*params: SamplingParams, eos: tuple[int, ...] = (0,)) -> Sampler:
    dev = _DEV[0]
    s = _OnDevice(dev, 8, eos)
    s.update_state(
        [SamplerRow(p, None if p.greedy else make_generator(p.seed or 0, dev), 0) for p in params]
    )
    return s


def test_greedy_rows_take_argmax():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, 0, 0, 0, 0]]).repeat(2, 1)
    s = sampler_for(SamplingParams(temperature=0), SamplingParams(temperature=0))
    assert s.sample(logits, None).tolist() == [2, 2]


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, 8)
    s = sampler_for(
        SamplingParams(temperature=1.0, top_k=1, seed=1),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=2),
        SamplingParams(temperature=1.0, min_p=1.0, seed=3),
    )
    for _ in range(5):
        assert s.sample(logits, None).tolist() == logits.argmax(-1).tolist()


def test_top_k_restricts_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0, 0, 0, 0]])
    s = sampler_for(SamplingParams(temperature=5.0, top_k=2, seed=7))
    seen = {s.sample(logits, None).item() for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_frequencies_follow_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]]))
    s = sampler_for(SamplingParams(temperature=1.0, seed=11))
    counts = torch.zeros(8)
    for _ in range(3000):
        counts[s.sample(logits, None).item()] += 1
    freq = counts / counts.sum()
    assert abs(freq[0] - 0.5) < 0.04 and abs(freq[1] - 0.3) < 0.04 and abs(freq[2] - 0.2) < 0.04


def test_same_seed_same_tokens_regardless_of_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(1, 8)
    p = SamplingParams(temperature=1.0, seed=42)
    solo = sampler_for(p)
    alone = [solo.sample(logits, None).item() for _ in range(20)]
    mixed = sampler_for(SamplingParams(temperature=0.7, seed=5), p, SamplingParams(temperature=0))
    together = [mixed.sample(logits.repeat(3, 1), None)[1].item() for _ in range(20)]
    assert alone == together


def test_repetition_penalty_and_eos_blocking():
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0, 0, 0, 0, 0]])
    seen = torch.zeros(1, 8, dtype=torch.bool)
    seen[0, 1] = True
    s = sampler_for(SamplingParams(temperature=0, repetition_penalty=10.0, ignore_eos=True))
    # EOS (0) banned, token 1 penalised (2 → 0.2): argmax becomes 2.
    assert s.sample(logits, seen).item() == 2
    s = sampler_for(SamplingParams(temperature=0, min_tokens=1))
    assert s.sample(logits, None).item() == 1
    s.rows[0].generated = 1
    assert s.sample(logits, None).item() == 0


# ------------------------------------------------------------- numerics (issue 15)
def test_tiny_temperature_is_greedy():
    """Regression (15.3): temperature=1e-38 used to give NaN probabilities and token 0."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0, 0, 0, 0, 0]])
    for t in (1e-38, 1e-45, 1e-7):
        s = sampler_for(SamplingParams(temperature=t, seed=3))
        assert s.sample(logits, None).tolist() == [1]
    # Just above the epsilon it still samples (but only ever the argmax at this gap).
    s = sampler_for(SamplingParams(temperature=2e-6, seed=3))
    assert s.sample(logits, None).tolist() == [1]
    assert not s.greedy.any().item()


def _penalized(logits, outputs, presence, frequency):
    """OpenAI's formula with Python loops: logit[j] -= c[j]·frequency + [c[j] > 0]·presence."""
    out = logits.clone()
    for b, toks in enumerate(outputs):
        for j in range(logits.shape[1]):
            c = toks.count(j)
            out[b, j] -= c * frequency[b] + (1.0 if c > 0 else 0.0) * presence[b]
    return out


def test_presence_and_frequency_penalties_follow_openai_semantics():
    torch.manual_seed(0)
    pres, freq = [0.7, 0.0, -1.5], [0.3, 1.2, 0.0]
    params = [SamplingParams(temperature=0, presence_penalty=p, frequency_penalty=f)
              for p, f in zip(pres, freq, strict=True)]
    s = sampler_for(*params)
    outputs: list[list[int]] = [[], [], []]
    for _ in range(6):
        logits = torch.randn(3, 8)
        want = _penalized(logits, outputs, pres, freq).argmax(-1).tolist()
        got = s.sample(logits, None).tolist()
        assert got == want
        for b, t in enumerate(got):
            outputs[b].append(t)


def test_penalty_counts_survive_batch_composition_changes():
    torch.manual_seed(1)
    p_pen = SamplingParams(temperature=0, frequency_penalty=1.0)
    rows = [SamplerRow(SamplingParams(temperature=0), None, 0), SamplerRow(p_pen, None, 0)]
    s = _OnDevice(_DEV[0], 8, (0,))
    s.update_state(rows)
    history: list[int] = []
    for step in range(8):
        if step == 3:  # row 0 leaves, a new row joins in front
            rows = [SamplerRow(SamplingParams(temperature=0), None, 0), rows[1]]
            s.update_state(rows)
        logits = torch.randn(2, 8)
        want = _penalized(logits[1:], [history], [0.0], [1.0]).argmax(-1).item()
        got = s.sample(logits, None).tolist()
        assert got[1] == want
        history.append(got[1])


def test_bans_apply_after_every_penalty():
    logits = torch.tensor([[0.0, 1.0, 9.0, 2.0, 0, 0, 0, 0]])
    bans = (torch.tensor([0]), torch.tensor([2]))
    # Negative presence penalty (a boost) on token 2 cannot bring it back either.
    s = sampler_for(SamplingParams(temperature=0, presence_penalty=-2.0))
    s._counts[0, 2] = 1.0
    assert s.sample(logits, None, bans).tolist() == [3]
    s = sampler_for(SamplingParams(temperature=0.8, seed=5))
    assert all(s.sample(logits, None, bans).item() != 2 for _ in range(50))
