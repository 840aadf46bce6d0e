"""The engine: one thread owns the model and runs continuous batching.

Requests wait in a bounded queue and join the running batch at step boundaries; each
loop iteration (1) drops cancelled rows, (2) prefills newly admitted rows as one group
and merges their KV cache into the batch, (3) runs the processor stack and the sampler
on every row's pending logits, (4) emits tokens, applies stop conditions and removes
finished rows, (5) runs one batched decode forward for the rows that remain. The
asyncio event loop never touches torch: results travel through per-request sinks.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from processors.base import StepContext
from processors.control import ControlSpec, build_phase, control_specs, phase_key
from processors.metrics import STEP_STAT_NAMES, step_stats, summarize
from processors.stack import ProcessorStack
from server.engine.aux import AuxPool
from server.engine.batch import BatchState, layer_kv, set_layer_kv
from server.engine.detok import IncrementalDetokenizer
from server.engine.observer import EngineObserver
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler, SamplerRow, make_generator
from server.engine.twins import UnsteeredTwins, wants_twin
from server.engine.types import (
    ErrorEvent,
    EventSink,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    RequestHandle,
    TokenEvent,
    TokenLogprob,
)

log = logging.getLogger("steerserve.engine")


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; retry after ``retry_after`` seconds."""

    def __init__(self, limit: int, retry_after: int = 1) -> None:
        super().__init__(f"the request queue is full ({limit} waiting); retry later")
        self.retry_after = retry_after


class EngineUnavailableError(RuntimeError):
    """The engine is not running (starting, stopped, draining or dead)."""


@dataclass
class EngineConfig:
    """Engine limits (a subset of the server settings)."""

    max_batch_size: int = 16
    max_queue: int = 64
    max_prefill_tokens: int = 8192
    request_timeout_s: float | None = None  # default per-request budget (None = unlimited)


@dataclass
class _Row:
    """Host-side state of one running request."""

    handle: RequestHandle
    sink: EventSink
    detok: IncrementalDetokenizer
    sampler_row: SamplerRow
    output: list[int] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    finish: FinishReason | None = None
    last_token_at: float = 0.0  # time.monotonic() of the previous emitted token

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the generation config and the tokenizer (either may list several)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


class Engine:
    """Continuous-batching decode loop over one frozen model.

    Use ``submit`` from any thread; events are delivered to the request's ``sink`` on
    the engine thread (the sink must be cheap and thread-safe).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: EngineConfig | None = None,
        aux_models: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.runner = ModelRunner(self.model)
        self.device = self.runner.device
        self.vocab_size = self.runner.vocab_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._eos_set = set(self.eos_ids)
        self.batch = BatchState(self.vocab_size, self.device)
        self.twins = UnsteeredTwins(self.runner, self.vocab_size, self.device)
        self._decode_phase: Any = None  # control-vector deltas of decode steps (PhaseDeltas)
        self.stack = ProcessorStack(self.device, self.vocab_size)
        # Fusion's auxiliary models (name -> model), each with its own KV cache.
        self.aux = AuxPool(aux_models or {}, self.vocab_size)
        self.sampler = Sampler(self.device, self.vocab_size, self.eos_ids)
        self.rows: list[_Row] = []
        self._waiting: deque[tuple[RequestHandle, EventSink]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dirty = True  # batch composition changed since the last rebuild
        self._any_diag = False
        self._logprobs_k: int | None = None  # max top-k asked by a row; None = no row asks
        self.observer = EngineObserver()  # replaced by the server's metrics
        self.dead: str | None = None
        self.steps = 0
        self.peak_batch = 0  # largest batch decoded so far (tests, benchmarks)
        self.prefill_rows = 0  # prompts actually prefilled (shared prefixes count once)

    # ----------------------------------------------------------------- public API
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="steer-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything and stop the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> int:
        """Rows currently decoding."""
        return len(self.rows)

    @property
    def waiting(self) -> int:
        """Requests admitted to the queue but not yet prefilled."""
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """True while the engine thread runs and has not died."""
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def submit(self, request: GenerationRequest, sink: EventSink) -> RequestHandle:
        """Queue a request; raise QueueFullError when the waiting queue is full."""
        return self.submit_many([(request, sink)])[0]

    def submit_many(
        self, items: Sequence[tuple[GenerationRequest, EventSink]]
    ) -> list[RequestHandle]:
        """Queue several requests atomically (all or none), so that they are admitted
        together when the batch has room — a sweep's points then share one prefill."""
        if not self.alive or self._stopping:
            raise EngineUnavailableError(self.dead or "the engine is not running")
        now = time.monotonic()
        handles = [RequestHandle(req, submitted=now) for req, _ in items]
        with self._cond:
            if len(self._waiting) + len(items) > self.config.max_queue:
                raise QueueFullError(self.config.max_queue)
            self._waiting.extend(zip(handles, [sink for _, sink in items], strict=True))
            self._cond.notify_all()
        return handles

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self.rows and not self._waiting:
                        self._cond.wait(timeout=0.5)
                    if self._stopping:
                        break
                    new = self._admit()
                try:
                    self._iteration(new)
                except Exception as exc:  # a failed step fails its rows, not the server
                    log.exception("engine step failed")
                    self._fail_all(new, f"internal error during decoding: {exc}")
        except BaseException as exc:  # pragma: no cover - last-resort guard
            self.dead = f"engine thread died: {exc!r}"
            log.exception("engine thread died")
        finally:
            self._abort_everything()

    def _admit(self) -> list[tuple[RequestHandle, EventSink]]:
        """Pop waiting requests that fit the batch and the prefill budget (lock held)."""
        new: list[tuple[RequestHandle, EventSink]] = []
        budget = self.config.max_prefill_tokens
        self._drop_waiting()
        while self._waiting and len(self.rows) + len(new) < self.config.max_batch_size:
            handle, sink = self._waiting[0]
            cost = len(handle.request.prompt_ids)
            if new and cost > budget:
                break
            self._waiting.popleft()
            if handle.cancelled:
                self._end_waiting(handle, sink, "abort", cancelled=True)
                continue
            budget -= cost
            new.append((handle, sink))
        return new

    def _expired(self, handle: RequestHandle, now: float) -> bool:
        """True when the request has used up its time budget (per request or default)."""
        limit = handle.request.timeout_s
        if limit is None:
            limit = self.config.request_timeout_s
        return limit is not None and now - handle.submitted >= limit

    def _drop_waiting(self) -> None:
        """Remove waiting requests that were cancelled or timed out (lock held), so that
        a disconnect frees its queue slot at once rather than when it reaches the head."""
        now = time.monotonic()
        if not any(h.cancelled or self._expired(h, now) for h, _ in self._waiting):
            return
        kept: deque[tuple[RequestHandle, EventSink]] = deque()
        for handle, sink in self._waiting:
            if handle.cancelled:
                self._end_waiting(handle, sink, "abort", cancelled=True)
            elif self._expired(handle, now):
                self._end_waiting(handle, sink, "timeout")
            else:
                kept.append((handle, sink))
        self._waiting = kept

    def _end_waiting(
        self, handle: RequestHandle, sink: EventSink, reason: FinishReason, cancelled: bool = False
    ) -> None:
        """Finish a request that never left the queue."""
        cost = len(handle.request.prompt_ids)
        self._emit(sink, FinishEvent(reason, "", cost, 0))
        e2e = time.monotonic() - handle.submitted
        self.observer.on_finish(handle.request, reason, cost, 0, e2e, cancelled)

    def _iteration(self, new: list[tuple[RequestHandle, EventSink]]) -> None:
        self._drop_cancelled()
        if new:
            self._prefill(new)
        if self.rows:
            self._step()

    def _prefill(self, new: Sequence[tuple[RequestHandle, EventSink]]) -> None:
        # Rows with the same prompt and the same control deltas on it (a sweep's grid
        # points) share one prefill: the unique (prompt, deltas) run once and their cache
        # rows are copied to every user. The group's deltas come from its own requests.
        # Unsteered twins (server.engine.twins) are extra rows of the same forward.
        unique: dict[tuple[Any, ...], int] = {}
        reps: list[tuple[ControlSpec, ...]] = []

        def slot(prompt: tuple[int, ...], specs: tuple[ControlSpec, ...]) -> int:
            key = (prompt, phase_key(specs, "prompt"))
            if key not in unique:
                unique[key] = len(unique)
                reps.append(specs)
            return unique[key]

        specs = [control_specs(h.request.steering) for h, _ in new]
        owner = [slot(h.request.prompt_ids, s) for (h, _), s in zip(new, specs, strict=True)]
        twin = [wants_twin(h.request, s) for (h, _), s in zip(new, specs, strict=True)]
        twin_owner = [
            slot(h.request.prompt_ids, ()) for (h, _), t in zip(new, twin, strict=True) if t
        ]
        phase = build_phase(reps, "prompt", self.device, self.runner.dtype)
        cache, mask, last, logits = self.runner.prefill([k[0] for k in unique], phase)
        self.twins.add(
            twin, cache, mask, last, logits,
            torch.tensor(twin_owner, dtype=torch.long, device=self.device),
        )
        if owner != list(range(len(unique))):
            idx = torch.tensor(owner, dtype=torch.long, device=self.device)
            for layer in cache.layers:
                keys, values = layer_kv(layer)
                set_layer_kv(layer, keys.index_select(0, idx), values.index_select(0, idx))
            mask, last, logits = mask[idx], last[idx], logits[idx]
        self.prefill_rows += len(unique)
        self.batch.add(cache, mask, last, logits)
        now = time.monotonic()
        for handle, sink in new:
            req = handle.request
            self.observer.on_admitted(req, now - handle.submitted)
            seed = req.sampling.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            gen = None if req.sampling.greedy else make_generator(seed, self.device)
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, req.sampling.stop)
            self.rows.append(_Row(handle, sink, detok, SamplerRow(req.sampling, gen, 0)))
        self.aux.prefill([id(r.handle) for r in self.rows], [(id(h), h.request) for h, _ in new])
        self._dirty = True

    def _rebuild(self) -> None:
        """Rebuild processors and sampler tensors for the current composition."""
        self.stack.update_state([r.request.steering for r in self.rows])
        self._decode_phase = build_phase(
            [control_specs(r.request.steering) for r in self.rows],
            "generated",
            self.device,
            self.runner.dtype,
        )
        self.sampler.update_state([r.sampler_row for r in self.rows])
        if self.sampler.any_rep:
            self.batch.rebuild_seen([list(r.request.prompt_ids) + r.output for r in self.rows])
        else:
            self.batch.seen = None
        self._any_diag = any(r.request.diagnostics != "off" for r in self.rows)
        asked = [r.request.sampling.logprobs for r in self.rows]
        self._logprobs_k = max((k for k in asked if k is not None), default=None)
        self._dirty = False

    def _step(self) -> None:
        if self._dirty:
            self._rebuild()
        self.peak_batch = max(self.peak_batch, len(self.rows))
        fwd = self.batch.next_logits  # (B, V) as the (possibly control-steered) forward gave
        base = self.twins.base_logits(fwd)  # unsteered logits for rows with a twin
        ctx = StepContext(
            base_logits=base, last_tokens=self.batch.last_tokens, want_stats=self._any_diag
        )
        if self.aux.active:  # fusion: the auxiliary models' logits of this step
            keys = [id(r.handle) for r in self.rows]
            ctx.extras["aux_logits"] = self.aux.logits(keys, len(self.rows))
        steered = self.stack.apply(ctx, fwd) if self.stack.active else fwd
        tokens = self.sampler.sample(steered, self.batch.seen)  # (B,)
        names: list[str] = []
        # Logprobs only when some row asks: log_softmax of the steered logits, the
        # emitted token's value and the top-k, shipped in the same host transfer.
        lp_cols = self._logprob_cols(steered, tokens) if self._logprobs_k is not None else []
        if self._any_diag or lp_cols:
            cols = [tokens.double().view(-1, 1)]
        if self._any_diag:
            stats = step_stats(base, steered, tokens)
            # Processors cannot know the emitted token in apply(); they register (B, V)
            # tables under extras["token_stats"] and we gather them here (NaN = undefined).
            idx = tokens.view(-1, 1)
            for name, table in ctx.extras.get("token_stats", {}).items():
                ctx.stats[name] = table.gather(1, idx).squeeze(1)
            extra = sorted(ctx.stats)
            names = list(STEP_STAT_NAMES) + extra
            cols.append(stats.double())
            cols += [ctx.stats[k].double().view(-1, 1) for k in extra]
        if self._any_diag or lp_cols:
            host = torch.cat(cols + lp_cols, dim=1).tolist()  # the one host transfer
            host_tokens = [int(r[0]) for r in host]
        else:
            host_tokens = tokens.tolist()  # the one host transfer of this step
        self.steps += 1
        now = time.monotonic()
        lp_at = 1 + len(names)  # first logprob column in a host row

        keep: list[int] = []
        for b, (row, token) in enumerate(zip(self.rows, host_tokens, strict=True)):
            if self._any_diag and row.request.diagnostics != "off":
                row.steps.append(dict(zip(names, host[b][1:lp_at], strict=True)))
            lp = None
            k = row.request.sampling.logprobs
            if k is not None:
                vals = host[b][lp_at:]
                kmax = self._logprobs_k or 0
                top = tuple(
                    (int(vals[1 + kmax + j]), vals[1 + j]) for j in range(min(k, kmax))
                )
                lp = TokenLogprob(vals[0], top)
            self._advance_row(row, token, now, lp)
            if row.finish is None:
                keep.append(b)
        if len(keep) != len(self.rows):
            self.rows = [self.rows[b] for b in keep]
            self.batch.select(keep)
            self.twins.select(keep)
            self.aux.sync([id(r.handle) for r in self.rows])  # frees their aux caches
            self._dirty = True
            if keep:
                tokens = tokens.index_select(0, torch.tensor(keep, device=tokens.device))
        if self.rows:
            if self._dirty:  # rows left: their deltas must leave the decode phase too
                self._rebuild()
            self.batch.append_tokens(tokens)
            self.batch.next_logits = self.runner.decode(self.batch, tokens, self._decode_phase)
            self.twins.decode(tokens)
            if self.aux.active:  # same tokens, each auxiliary model's own rows and cache
                self.aux.decode([id(r.handle) for r in self.rows], tokens)

    def _logprob_cols(self, steered: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """``[(B,1) chosen, (B,k) top values, (B,k) top ids]`` as float64 columns."""
        lp = steered.float().log_softmax(dim=-1)  # (B, V)
        chosen = lp.gather(1, tokens.view(-1, 1))  # (B, 1)
        k = min(self._logprobs_k or 0, self.vocab_size)
        if k == 0:
            return [chosen.double()]
        top = lp.topk(k, dim=-1)
        return [chosen.double(), top.values.double(), top.indices.double()]

    def _advance_row(
        self, row: _Row, token: int, now: float, lp: TokenLogprob | None = None
    ) -> None:
        """Record one sampled token, emit its text, and decide whether the row ends."""
        params = row.request.sampling
        row.output.append(token)
        row.sampler_row.generated += 1
        n = len(row.output)
        since = row.handle.submitted if n == 1 else row.last_token_at
        self.observer.on_token(row.request, n == 1, now - since)
        row.last_token_at = now
        lps = (lp,) if lp is not None else None
        is_eos = token in self._eos_set and not params.ignore_eos and n > params.min_tokens
        if is_eos or token in params.stop_token_ids:
            row.finish = "stop"
            text = ""
        else:
            text = row.detok.push(token)
            if row.detok.stopped:
                row.finish = "stop"
            elif n >= params.max_tokens:
                row.finish = "length"
        if row.finish is None:
            if not self._emit(row.sink, TokenEvent((token,), text, lps)):
                row.finish = "abort"  # the consumer is gone: nobody to send a FinishEvent
                self._observe_finish(row, "abort", cancelled=True)
            return
        tail = text + row.detok.finish()
        self._emit(row.sink, TokenEvent((token,), "", lps))
        self._finish(row, row.finish, tail)

    def _observe_finish(self, row: _Row, reason: FinishReason, cancelled: bool = False) -> None:
        e2e = time.monotonic() - row.handle.submitted
        self.observer.on_finish(
            row.request, reason, len(row.request.prompt_ids), len(row.output), e2e, cancelled
        )

    def _finish(
        self, row: _Row, reason: FinishReason, text: str = "", cancelled: bool = False
    ) -> None:
        row.finish = reason
        self._observe_finish(row, reason, cancelled)
        diag = None
        if row.request.diagnostics != "off":
            diag = summarize(row.steps)
            if row.request.diagnostics == "steps":
                diag["per_step"] = {
                    k: [None if v != v else v for v in (s.get(k, math.nan) for s in row.steps)]
                    for k in (row.steps[0] if row.steps else {})
                }
                diag["per_step"]["token_id"] = list(row.output[: len(row.steps)])
        self._emit(
            row.sink,
            FinishEvent(reason, text, len(row.request.prompt_ids), len(row.output), diag),
        )

    def _drop_cancelled(self) -> None:
        """Finish rows whose client went away ("abort") or whose time ran out
        ("timeout"); their batch slots are free for the next admission."""
        now = time.monotonic()
        keep: list[int] = []
        for b, r in enumerate(self.rows):
            if r.handle.cancelled:
                self._finish(r, "abort", cancelled=True)
            elif self._expired(r.handle, now):
                self._finish(r, "timeout")
            else:
                keep.append(b)
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        self.batch.select(keep)
        self.twins.select(keep)
        self.aux.sync([id(r.handle) for r in self.rows])  # frees their aux caches
        self._dirty = True

    def _emit(self, sink: EventSink, event: Any) -> bool:
        """Deliver an event; False if the receiver is gone (its row is then dropped)."""
        try:
            sink(event)
            return True
        except Exception:  # noqa: BLE001 - a dead consumer must not kill the loop
            return False

    def _fail_all(self, new: Sequence[tuple[RequestHandle, EventSink]], message: str) -> None:
        sinks = [r.sink for r in self.rows]
        known = {id(r.handle) for r in self.rows}
        sinks += [s for h, s in new if id(h) not in known]
        for sink in sinks:
            self._emit(sink, ErrorEvent(message))
        for r in self.rows:
            self._observe_finish(r, "error")
        for h, _ in new:
            if id(h) not in known:
                self.observer.on_finish(h.request, "error", len(h.request.prompt_ids), 0, 0.0,
                                        False)
        self.rows = []
        self.batch = BatchState(self.vocab_size, self.device)
        self.twins.reset()
        self.aux.reset()
        self._dirty = True

    def _abort_everything(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for row in self.rows:
            self._finish(row, "abort")
        self.rows = []
        self.batch = BatchState(self.vocab_size, self.device)
        self.twins.reset()
        self.aux.reset()
        for handle, sink in waiting:
            self._end_waiting(handle, sink, "abort")


def run_to_completion(
    engine: Engine, request: GenerationRequest, timeout: float = 600.0
) -> tuple[list[int], str, FinishEvent]:
    """Submit ``request`` and block until it finishes (for tests and benchmarks).

    Returns the generated token ids, the full text and the final event; raises
    RuntimeError on an ErrorEvent.
    """
    import queue

    q: queue.Queue[Any] = queue.Queue()
    engine.submit(request, q.put)
    tokens: list[int] = []
    text: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        ev = q.get(timeout=max(0.0, deadline - time.monotonic()))
        if isinstance(ev, TokenEvent):
            tokens.extend(ev.token_ids)
            text.append(ev.text)
        elif isinstance(ev, FinishEvent):
            text.append(ev.text)
            return tokens, "".join(text), ev
        else:
            raise RuntimeError(ev.message)
