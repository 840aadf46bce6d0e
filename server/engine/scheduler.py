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
from processors.metrics import STEP_STAT_NAMES, step_stats, summarize
from processors.stack import ProcessorStack
from server.engine.batch import BatchState
from server.engine.detok import IncrementalDetokenizer
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler, SamplerRow, make_generator
from server.engine.types import (
    ErrorEvent,
    EventSink,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    RequestHandle,
    TokenEvent,
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

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.runner = ModelRunner(self.model)
        self.device = self.runner.device
        self.vocab_size = self.runner.vocab_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._eos_set = set(self.eos_ids)
        self.batch = BatchState(self.vocab_size, self.device)
        self.stack = ProcessorStack(self.device, self.vocab_size)
        self.sampler = Sampler(self.device, self.vocab_size, self.eos_ids)
        self.rows: list[_Row] = []
        self._waiting: deque[tuple[RequestHandle, EventSink]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dirty = True  # batch composition changed since the last rebuild
        self._any_diag = False
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
        handles = [RequestHandle(req) for req, _ in items]
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
        while self._waiting and len(self.rows) + len(new) < self.config.max_batch_size:
            handle, sink = self._waiting[0]
            cost = len(handle.request.prompt_ids)
            if new and cost > budget:
                break
            self._waiting.popleft()
            if handle.cancelled:
                self._emit(sink, FinishEvent("abort", "", cost, 0))
                continue
            budget -= cost
            new.append((handle, sink))
        return new

    def _iteration(self, new: list[tuple[RequestHandle, EventSink]]) -> None:
        self._drop_cancelled()
        if new:
            self._prefill(new)
        if self.rows:
            self._step()

    def _prefill(self, new: Sequence[tuple[RequestHandle, EventSink]]) -> None:
        # Rows with the same prompt (a sweep's grid points) share one prefill: the
        # unique prompts run once and their cache rows are copied to every user.
        unique: dict[tuple[int, ...], int] = {}
        owner = [unique.setdefault(h.request.prompt_ids, len(unique)) for h, _ in new]
        cache, mask, last, logits = self.runner.prefill(list(unique))
        if len(unique) != len(new):
            idx = torch.tensor(owner, dtype=torch.long, device=self.device)
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
            mask, last, logits = mask[idx], last[idx], logits[idx]
        self.prefill_rows += len(unique)
        self.batch.add(cache, mask, last, logits)
        for handle, sink in new:
            req = handle.request
            seed = req.sampling.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            gen = None if req.sampling.greedy else make_generator(seed, self.device)
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, req.sampling.stop)
            self.rows.append(_Row(handle, sink, detok, SamplerRow(req.sampling, gen, 0)))
        self._dirty = True

    def _rebuild(self) -> None:
        """Rebuild processors and sampler tensors for the current composition."""
        self.stack.update_state([r.request.steering for r in self.rows])
        self.sampler.update_state([r.sampler_row for r in self.rows])
        if self.sampler.any_rep:
            self.batch.rebuild_seen([list(r.request.prompt_ids) + r.output for r in self.rows])
        else:
            self.batch.seen = None
        self._any_diag = any(r.request.diagnostics != "off" for r in self.rows)
        self._dirty = False

    def _step(self) -> None:
        if self._dirty:
            self._rebuild()
        self.peak_batch = max(self.peak_batch, len(self.rows))
        base = self.batch.next_logits  # (B, V)
        ctx = StepContext(
            base_logits=base, last_tokens=self.batch.last_tokens, want_stats=self._any_diag
        )
        steered = self.stack.apply(ctx, base) if self.stack.active else base
        tokens = self.sampler.sample(steered, self.batch.seen)  # (B,)
        names: list[str] = []
        if self._any_diag:
            stats = step_stats(base, steered, tokens)
            # Processors cannot know the emitted token in apply(); they register (B, V)
            # tables under extras["token_stats"] and we gather them here (NaN = undefined).
            idx = tokens.view(-1, 1)
            for name, table in ctx.extras.get("token_stats", {}).items():
                ctx.stats[name] = table.gather(1, idx).squeeze(1)
            extra = sorted(ctx.stats)
            names = list(STEP_STAT_NAMES) + extra
            cols = [tokens.double().view(-1, 1), stats.double()]
            cols += [ctx.stats[k].double().view(-1, 1) for k in extra]
            host = torch.cat(cols, dim=1).tolist()  # the one host transfer of this step
            host_tokens = [int(r[0]) for r in host]
        else:
            host_tokens = tokens.tolist()  # the one host transfer of this step
        self.steps += 1

        keep: list[int] = []
        for b, (row, token) in enumerate(zip(self.rows, host_tokens, strict=True)):
            if self._any_diag and row.request.diagnostics != "off":
                row.steps.append(dict(zip(names, host[b][1:], strict=True)))
            self._advance_row(row, token)
            if row.finish is None:
                keep.append(b)
        if len(keep) != len(self.rows):
            self.rows = [self.rows[b] for b in keep]
            self.batch.select(keep)
            self._dirty = True
            if keep:
                tokens = tokens.index_select(0, torch.tensor(keep, device=tokens.device))
        if self.rows:
            self.batch.append_tokens(tokens)
            self.batch.next_logits = self.runner.decode(self.batch, tokens)

    def _advance_row(self, row: _Row, token: int) -> None:
        """Record one sampled token, emit its text, and decide whether the row ends."""
        params = row.request.sampling
        row.output.append(token)
        row.sampler_row.generated += 1
        n = len(row.output)
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
            if not self._emit(row.sink, TokenEvent((token,), text)):
                row.finish = "abort"
            return
        tail = text + row.detok.finish()
        self._emit(row.sink, TokenEvent((token,), ""))
        self._finish(row, row.finish, tail)

    def _finish(self, row: _Row, reason: FinishReason, text: str = "") -> None:
        row.finish = reason
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
        keep = [b for b, r in enumerate(self.rows) if not r.handle.cancelled]
        if len(keep) == len(self.rows):
            return
        for r in self.rows:
            if r.handle.cancelled:
                self._finish(r, "abort")
        self.rows = [self.rows[b] for b in keep]
        self.batch.select(keep)
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
        self.rows = []
        self.batch = BatchState(self.vocab_size, self.device)
        self._dirty = True

    def _abort_everything(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for row in self.rows:
            self._finish(row, "abort")
        self.rows = []
        self.batch = BatchState(self.vocab_size, self.device)
        for handle, sink in waiting:
            self._emit(sink, FinishEvent("abort", "", len(handle.request.prompt_ids), 0))


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
