"""GPU-readiness of the engine, checked on the CPU (issue 20 items 1, 2, 3, 5; 15 item 2).

* the attention mask of a left-padded prefill has no fully-masked query row (checked
  against a brute-force oracle, and on the mask the model actually receives);
* a device failure ends every request with an error, touches no tensor allocator on the
  way out, and marks the engine dead (so /health answers 503);
* a row whose steered logits are non-finite ends with a 422 naming its steering entry,
  while the other rows of the batch carry on exactly as solo;
* auxiliary models on another device are refused clearly when they cannot be moved;
* a steady decode step does one device→host transfer, a join/leave step at most three.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from processors.base import Processor, ProcessorEnv, StepContext
from processors.stack import _REGISTRY, parse_stack, register
from server.engine import Engine, EngineConfig, ErrorEvent, FinishEvent, TokenEvent
from server.engine.aux import AuxPool
from server.engine.padding import attention_mask_4d, left_pad
from server.engine.runner import ModelRunner
from tests.conftest import collect_events, make_request


# ------------------------------------------------------------------ 20.1: the mask
def test_mask_matches_brute_force_and_no_row_is_fully_masked(device: torch.device) -> None:
    prompts = [[5], [1, 2, 3, 4, 5], [7, 8]]  # row 0: four padding queries
    padded = left_pad(prompts, device)
    K = padded.mask.shape[1]
    for q_len in (K, 1, 2):
        got = attention_mask_4d(padded.mask, q_len, torch.float32).cpu()
        assert got.shape == (3, 1, q_len, K)
        for b, p in enumerate(prompts):
            first_real = K - len(p)
            for q in range(q_len):
                pos = K - q_len + q
                for k in range(K):
                    attend = (k == pos) or (first_real <= k <= pos)
                    assert (got[b, 0, q, k] == 0) == attend, (b, q, k)
        # no query row is entirely masked
        assert bool(((got == 0).sum(-1) > 0).all())


def test_padded_prefill_passes_that_mask_and_equals_solo(tiny_bundle: Any) -> None:
    model = tiny_bundle.model
    runner = ModelRunner(model)
    seen: list[torch.Tensor | None] = []

    def grab(_mod: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs.get("attention_mask"))

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        short, long = [11, 12], [3, 4, 5, 6, 7, 8]
        group = runner.prefill([short, long])
        solo = [runner.prefill([p]).next_logits for p in (short, long)]
    finally:
        handle.remove()
    mask = seen[0]
    assert mask is not None and mask.dim() == 4  # our mask, not transformers' own
    allowed = mask == 0
    assert not bool((allowed.sum(-1) == 0).any())  # the padded row's queries included
    assert allowed[0, 0, 0].sum() == 1  # a padding query sees only itself
    assert seen[1] is None and seen[2] is None  # unpadded: no mask to build or check
    assert torch.isfinite(group.next_logits).all()
    for b in range(2):
        torch.testing.assert_close(group.next_logits[b], solo[b][0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ 15.2: non-finite rows
class _Poison(Processor[str]):
    """Test-only processor: turns its rows' logits into NaN or all -inf."""

    type_name = "test_poison"

    @classmethod
    def validate(cls, entry: Any, env: ProcessorEnv) -> str:
        return str(entry.get("kind", "nan"))

    def update_state(self, specs: Sequence[str | None]) -> None:
        self.kinds = specs
        self._active = any(s is not None for s in specs)

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        for b, kind in enumerate(self.kinds):
            if kind is not None:
                out[b] = float("nan") if kind == "nan" else float("-inf")
        return out


@pytest.fixture
def poison() -> Iterator[None]:
    register(_Poison)
    yield
    _REGISTRY.pop("test_poison", None)


def _events(q: queue.Queue[Any]) -> list[Any]:
    out = []
    while True:
        ev = q.get(timeout=60)
        out.append(ev)
        if isinstance(ev, FinishEvent | ErrorEvent):
            return out


@pytest.mark.parametrize("kind", ["nan", "neginf"])
def test_nonfinite_row_ends_with_422_naming_its_entry(
    tiny_bundle: Any, tiny_engine: Engine, poison: None, kind: str
) -> None:
    tok = tiny_bundle.tokenizer
    env = ProcessorEnv(vocab_size=tiny_engine.vocab_size)
    stack = parse_stack(
        [{"type": "logit_bias", "bias": {"3": 1.0}}, {"type": "test_poison", "kind": kind}],
        env, max_len=8,
    )
    bad = make_request(tok, "hello there", rid="bad", steering=stack, max_tokens=6,
                       temperature=0, ignore_eos=True)
    good = make_request(tok, "a longer prompt here", rid="good", max_tokens=6,
                        temperature=0, ignore_eos=True)
    solo_q: queue.Queue[Any] = queue.Queue()
    tiny_engine.submit(good, solo_q.put)
    solo = collect_events(solo_q)[0]
    qs: list[queue.Queue[Any]] = [queue.Queue(), queue.Queue()]
    tiny_engine.submit_many([(bad, qs[0].put), (good, qs[1].put)])
    bad_events = _events(qs[0])
    assert not any(isinstance(e, TokenEvent) for e in bad_events)  # never a silent token
    err = bad_events[-1]
    assert isinstance(err, ErrorEvent) and err.code == 422
    assert "steering.1" in err.message and "test_poison" in err.message
    assert collect_events(qs[1])[0] == solo  # the other row is untouched


# ------------------------------------------------------------ 20.2: device failure
def test_device_failure_reaches_every_client_and_allocates_nothing(tiny_bundle: Any) -> None:
    tok = tiny_bundle.tokenizer
    engine = Engine(tiny_bundle.model, tok, EngineConfig(max_batch_size=2, max_queue=8))
    engine.start()
    real_decode = engine.runner.decode
    calls = {"n": 0}
    poisoned: list[str] = []
    originals = {name: getattr(torch, name) for name in ("zeros", "empty", "full", "tensor",
                                                         "cat", "ones")}

    def failing_decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] < 3:
            return real_decode(*args, **kwargs)
        # From here on any tensor allocation on the engine thread is an error.
        for name, fn in originals.items():
            def trap(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
                if threading.current_thread().name == "steer-engine":
                    poisoned.append(_name)
                return _fn(*a, **k)
            setattr(torch, name, trap)
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    engine.runner.decode = failing_decode  # type: ignore[method-assign]
    try:
        reqs = [make_request(tok, f"prompt {i}", rid=f"f{i}", max_tokens=50, temperature=0,
                             ignore_eos=True) for i in range(4)]
        qs: list[queue.Queue[Any]] = [queue.Queue() for _ in reqs]
        for r, q in zip(reqs, qs, strict=True):
            engine.submit(r, q.put)  # two run, two wait
        finals = [_events(q)[-1] for q in qs]
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        engine.stop()
    assert all(isinstance(f, ErrorEvent) for f in finals), finals
    assert poisoned == []  # the failure path allocated nothing
    assert engine.dead is not None and not engine.alive  # /health: 503


# ------------------------------------------------------------ 20.3: aux devices
def test_aux_model_that_cannot_move_is_refused(tiny_bundle: Any) -> None:
    meta = type(tiny_bundle.model)(tiny_bundle.model.config).to("meta")
    with pytest.raises(ValueError, match="auxiliary model 'small'.*main model is on cpu"):
        AuxPool({"small": meta}, tiny_bundle.model.config.vocab_size, torch.device("cpu"))


# ------------------------------------------------------------ 20.5: host syncs
_SYNC_METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "numpy", "cpu",
                 "__index__")


_UPLOADS = ("tensor", "as_tensor", "from_numpy")  # host data becoming a tensor


@pytest.mark.parametrize(("overlap", "lean"), [(False, False), (True, False), (False, True)])
def test_host_syncs_per_step(
    tiny_bundle: Any, monkeypatch: pytest.MonkeyPatch, overlap: bool, lean: bool
) -> None:
    """Counts the Tensor methods that copy to the host, on the engine thread and the
    forward's helper thread (overlap), per step; and the host→device uploads of a step
    where rows only leave (their per-row state follows the rows on the device). Also
    with the lean forward (server.engine.lean) forced on."""
    tok = tiny_bundle.tokenizer
    engine = Engine(tiny_bundle.model, tok,
                    EngineConfig(max_batch_size=8, overlap=overlap, lean=lean))
    assert (engine.runner.lean is not None) == lean
    counts: Counter[str] = Counter()
    uploads: Counter[str] = Counter()

    def ours() -> bool:
        return threading.current_thread().name.startswith(("steer-engine", "steer-forward"))

    for name in _SYNC_METHODS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self: torch.Tensor, *a: Any, _orig: Any = orig, _n: str = name,
                    **k: Any) -> Any:
            if ours():
                counts[_n] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    for name in _UPLOADS:
        make = getattr(torch, name)

        def made(*a: Any, _make: Any = make, _n: str = name, **k: Any) -> Any:
            if ours():
                uploads[_n] += 1
            return _make(*a, **k)

        monkeypatch.setattr(torch, name, made)
    per_step: list[tuple[int, int, int, bool]] = []  # (rows before, rows after, syncs, join)
    real_step, real_prefill = engine._step, engine._prefill
    joined = {"flag": False}

    def prefill(new: Any) -> None:
        joined["flag"] = True
        real_prefill(new)

    leave_uploads: list[int] = []

    def step() -> None:
        before, n0, u0 = len(engine.rows), sum(counts.values()), sum(uploads.values())
        real_step()
        per_step.append((before, len(engine.rows), sum(counts.values()) - n0, joined["flag"]))
        if 0 < len(engine.rows) < before and not joined["flag"]:
            leave_uploads.append(sum(uploads.values()) - u0)
        joined["flag"] = False

    engine._step, engine._prefill = step, prefill  # type: ignore[method-assign]
    env = ProcessorEnv(vocab_size=engine.vocab_size)
    engine.start()
    try:
        prompts = ["hi", "a much longer prompt than the first", "mid length one"]
        reqs = [
            make_request(tok, p, rid=f"s{i}", max_tokens=6 + 3 * i, temperature=0.8 * (i % 2),
                         seed=i, ignore_eos=True, repetition_penalty=1.2 if i == 1 else 1.0,
                         steering=parse_stack([{"type": "logit_bias", "bias": {"7": 2.0}}],
                                              env, max_len=4) if i == 2 else ())
            for i, p in enumerate(prompts)
        ]
        qs: list[queue.Queue[Any]] = [queue.Queue() for _ in reqs]
        engine.submit_many([(r, q.put) for r, q in zip(reqs, qs, strict=True)])
        for q in qs:
            collect_events(q)
    finally:
        engine.stop()
    steady = [s for b, a, s, j in per_step if b == a and not j]
    changing = [s for b, a, s, j in per_step if b != a or j]
    assert steady and changing
    assert max(steady) == 1, per_step
    assert max(changing) <= 3, per_step
    # Rows leaving (11 uploads before issue 20.5's rework, 5 before Processor.select):
    # only the kept rows' index, uploaded once by the engine; the cache, the sampled
    # tokens, the sampler's table and EOS-block rows and logit_bias's entries are all
    # indexed with it on the device; no repetition-presence rebuild from every row's
    # whole history (the rows follow on the device).
    assert leave_uploads and max(leave_uploads) <= 1, leave_uploads


# ------------------------------------------------------------ 20.8: admission
def test_admission_budgets_rows_times_longest_prompt(tiny_bundle: Any) -> None:
    tok = tiny_bundle.tokenizer
    budget = 60
    engine = Engine(tiny_bundle.model, tok,
                    EngineConfig(max_batch_size=16, max_prefill_tokens=budget))
    groups: list[list[int]] = []
    real = engine.runner.prefill

    def prefill(prompts: Any, phase: Any = None) -> Any:
        groups.append([len(p) for p in prompts])
        return real(prompts, phase)

    engine.runner.prefill = prefill  # type: ignore[method-assign]
    long = make_request(tok, "word " * 40, rid="long", max_tokens=2, temperature=0)
    shorts = [make_request(tok, f"hi {i}", rid=f"s{i}", max_tokens=2, temperature=0)
              for i in range(6)]
    reqs = [long, *shorts]
    qs: list[queue.Queue[Any]] = [queue.Queue() for _ in reqs]
    engine.start()
    try:
        engine.submit_many([(r, q.put) for r, q in zip(reqs, qs, strict=True)])  # one admit
        for q in qs:
            collect_events(q)
    finally:
        engine.stop()
    assert sum(len(g) for g in groups) == len(reqs)
    for g in groups:  # what the padded prefill holds
        assert len(g) == 1 or len(g) * max(g) <= budget, groups
    # the sum-of-lengths rule would have put the long prompt with two short ones
    assert len(groups[0]) == 1 and len(groups[0]) * max(groups[0]) > 40
