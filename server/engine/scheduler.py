"""The engine: one thread owns the model and runs continuous batching.

Requests wait in a bounded queue and join the running batch at step boundaries; each
loop iteration (1) drops cancelled rows, (2) prefills newly admitted rows as one group
and merges their KV cache into the batch, (3) runs the processor stack and the sampler
on every row's pending logits, (4) emits tokens, applies stop conditions and removes
finished rows, (5) runs one batched decode forward for the rows that remain (with
``EngineConfig.overlap``, (5) is launched before (4) for every row, and the rows that
ended are dropped from its result; docs/engine.md), then (6) runs one chunk of the head
extraction job, if any (``server.engine.extract``): every forward of the model runs on
this thread (or, with overlap on the CPU, on its one helper thread, while this one waits
for it). The asyncio event loop never touches torch: results travel through
per-request sinks and job futures.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch

from processors.base import StepContext
from processors.control import (
    ControlSpec,
    build_phase,
    control_specs,
    phase_key,
    summarize_receipt,
)
from processors.metrics import STEP_STAT_NAMES, step_stats, summarize
from processors.stack import ProcessorStack, acts_in_forward
from server.engine.aux import AuxPool
from server.engine.batch import BatchState
from server.engine.detok import IncrementalDetokenizer
from server.engine.extract import ExtractionJob, JobQueue
from server.engine.hooks import RowControl
from server.engine.observer import EngineObserver
from server.engine.packer import HostPacker, PackedHost
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
from server.threads import release_thread_pool

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

    max_batch_size: int = 32  # the server setting's default (server.settings)
    max_queue: int = 64
    max_prefill_tokens: int = 8192
    request_timeout_s: float | None = None  # default per-request budget (None = unlimited)
    fusion_memory_mb: int = 256  # dynamic fusion's per-chunk candidate buffer (MiB)
    # Launch the next decode before the host emits the step just sampled (issue 20.6).
    # None = where it pays: on CUDA (kernels run asynchronously, the launch returns at
    # once); off on the CPU, where the forward would have to run on a helper thread
    # (True does that) and the measured gain on 2 cores is nil (docs/engine.md).
    overlap: bool | None = None
    # The lean decoder forward (server.engine.lean) for Llama-family models. None = on
    # for low-precision weights (bf16/int4), off for fp32 (the exact reference); True
    # forces it on (tests compare it with the transformers forward), False off.
    lean: bool | None = None


@dataclass
class _Row:
    """Host-side state of one running request."""

    handle: RequestHandle
    sink: EventSink
    detok: IncrementalDetokenizer
    sampler_row: SamplerRow
    output: list[int] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)  # diagnostics per step
    # Per-step scalars recorded inside the forward (control hooks), always kept.
    forward_steps: list[dict[str, float]] = field(default_factory=list)
    control: RowControl | None = None  # control entries: receipt specs, after-triggers
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


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` left the accelerator in an unknown state (the engine must stop),
    as opposed to an error of one step's host logic."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False  # the device still works; the failed step's memory is freed
    if isinstance(exc, torch.AcceleratorError):
        return True
    text = str(exc)
    return "CUDA error" in text or "device-side assert" in text


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
        self.runner = ModelRunner(self.model, lean=self.config.lean)
        self.device = self.runner.device
        self.vocab_size = self.runner.vocab_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._eos_set = set(self.eos_ids)
        self.batch = BatchState(self.vocab_size, self.device)
        self.twins = UnsteeredTwins(self.device)
        self._decode_phase: Any = None  # control-vector deltas of decode steps (PhaseDeltas)
        self.stack = ProcessorStack(
            self.device,
            self.vocab_size,
            options={"fusion_memory_budget": self.config.fusion_memory_mb * 2**20},
        )
        # Fusion's auxiliary models (name -> model), each with its own KV cache.
        self.aux = AuxPool(aux_models or {}, self.vocab_size, self.device)
        self._packer = HostPacker(self.device)
        self.sampler = Sampler(self.device, self.vocab_size, self.eos_ids)
        self.rows: list[_Row] = []
        self._waiting: deque[tuple[RequestHandle, EventSink]] = deque()
        self.jobs = JobQueue()  # extraction jobs, one chunk run between steps
        self._cond = threading.Condition()
        self._keys = itertools.count()  # engine-wide request keys, assigned at submit
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dirty = True  # batch composition changed since the last rebuild
        # Batch rows kept since the last rebuild when rows only left (None: a join or a
        # reset happened, so everything is rebuilt from the host).
        self._leave_map: list[int] | None = None
        # ``_leave_map`` on the device (uploaded once per leave; the processors and the
        # sampler index their per-row tables with it), and the last leave's kept rows.
        self._leave_index: torch.Tensor | None = None
        self._any_diag = False
        self._logprobs_k: int | None = None  # max top-k asked by a row; None = no row asks
        self.observer = EngineObserver()  # replaced by the server's metrics
        self.dead: str | None = None
        self.steps = 0
        overlap = self.config.overlap
        if overlap is None:
            overlap = self.device.type == "cuda"
        # "inline": the decode is launched on this thread (asynchronous on CUDA);
        # "thread": it runs on a helper thread (torch releases the GIL in its kernels).
        self._overlap: str = "off"
        if overlap:
            self._overlap = "inline" if self.device.type == "cuda" else "thread"
        self._forward_pool: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------- public API
    def start(self) -> None:
        """Start the engine thread (idempotent).

        The calling thread's OpenMP workers are released first (it usually built or
        loaded the model): with two pools on a small CPU libgomp throttles both, and the
        engine thread's forwards ran 1.5-2x slower (server.threads).
        """
        if self._thread is None:
            release_thread_pool()
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
        if self._forward_pool is not None:
            self._forward_pool.shutdown(wait=True)
            self._forward_pool = None

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
        with self._cond:
            handles = [RequestHandle(req, submitted=now, key=next(self._keys))
                       for req, _ in items]
            # Waiting extraction jobs hold queue slots too (``submit_job``).
            if len(self._waiting) + len(self.jobs) + len(items) > self.config.max_queue:
                raise QueueFullError(self.config.max_queue)
            self._waiting.extend(zip(handles, [sink for _, sink in items], strict=True))
            self._cond.notify_all()
        return handles

    def submit_job(self, job: ExtractionJob) -> ExtractionJob:
        """Queue an extraction job (any thread); it shares ``max_queue`` with waiting
        requests (QueueFullError when full, EngineUnavailableError when not running).
        Wait on ``job.result``; set ``job.cancel`` to abandon it."""
        if not self.alive or self._stopping:
            raise EngineUnavailableError(self.dead or "the engine is not running")
        with self._cond:
            if len(self._waiting) + len(self.jobs) + 1 > self.config.max_queue:
                raise QueueFullError(self.config.max_queue)
            self.jobs.push(job)
            self._cond.notify_all()
        return job

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                with self._cond:
                    while (not self._stopping and not self.rows and not self._waiting
                           and not len(self.jobs)):
                        self._cond.wait(timeout=0.5)
                    if self._stopping:
                        break
                    new = self._admit()
                try:
                    self._iteration(new)
                except Exception as exc:  # a failed step fails its rows, not the server
                    log.exception("engine step failed")
                    self._fail_all(new, f"internal error during decoding: {exc}")
                    if is_device_failure(exc):
                        # The device's state is unknown (a CUDA error is sticky): stop
                        # here; /health answers 503 and waiting requests get an error.
                        self.dead = f"device failure: {exc}"
                        break
        except BaseException as exc:  # pragma: no cover - last-resort guard
            self.dead = f"engine thread died: {exc!r}"
            log.exception("engine thread died")
        finally:
            self._abort_everything()

    def _admit(self) -> list[tuple[RequestHandle, EventSink]]:
        """Pop waiting requests that fit the batch and the prefill budget (lock held).

        The budget is what the prefill forward really holds: the group is left-padded to
        its longest prompt, so it costs ``distinct prompts × longest prompt`` tokens (rows
        sharing a prompt, a sweep's points, share one prefill row). Admission stops at
        the first request that would push the group past ``max_prefill_tokens``; a
        request alone always fits (it is refused earlier if longer than the context).
        """
        new: list[tuple[RequestHandle, EventSink]] = []
        prompts: set[tuple[int, ...]] = set()
        longest = 0
        self._drop_waiting()
        while self._waiting and len(self.rows) + len(new) < self.config.max_batch_size:
            handle, sink = self._waiting[0]
            ids = handle.request.prompt_ids
            rows = len(prompts | {ids})
            if new and rows * max(longest, len(ids)) > self.config.max_prefill_tokens:
                break
            self._waiting.popleft()
            if handle.cancelled:
                self._end_waiting(handle, sink, "abort", cancelled=True)
                continue
            prompts.add(ids)
            longest = max(longest, len(ids))
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
        if len(self.jobs):  # between steps: one chunk of the head extraction job
            self.jobs.run_next(self.model, self.runner.hooks, self.config.max_prefill_tokens,
                               fatal=is_device_failure)

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
        group = self.runner.prefill([k[0] for k in unique], phase)
        if phase is not None and phase.stats:  # control receipts: prefill's share
            group.next_stats = dict(phase.stats)
        # The batch keeps the engine's rows first and the twins after them: the new rows
        # go before the old twins, the new twins at the end (server.engine.twins).
        order = owner + twin_owner
        if order != list(range(len(unique))):
            group = group.gather(order)
        self.batch.add(group, at=len(self.rows), head=len(owner))
        self.twins.join(twin)
        now = time.monotonic()
        for handle, sink in new:
            req = handle.request
            self.observer.on_admitted(req, now - handle.submitted)
            seed = req.sampling.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            gen = None if req.sampling.greedy else make_generator(seed, self.device)
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, req.sampling.stop)
            self.rows.append(_Row(handle, sink, detok, SamplerRow(req.sampling, gen, 0),
                                  control=RowControl.of(req.steering)))
        self.aux.prefill([r.handle.key for r in self.rows], [(h.key, h.request) for h, _ in new])
        self._dirty = True
        self._leave_map = self._leave_index = None  # a join: rebuild from the host

    def _rebuild(self) -> None:
        """Rebuild processors and sampler tensors for the current composition; when
        rows only left, the per-row tables follow the kept rows on the device instead
        (``ProcessorStack.select``, ``Sampler.select``: no upload)."""
        B = len(self.rows)
        leave_map, leave_index = self._leave_map, self._leave_index
        # Twins are rows B.. of the same forward with no control entry (zero delta).
        owners = self.twins.owners
        twin_rows = [self.rows[b] for b in owners]
        if leave_map is not None and leave_index is not None:
            # Rows only left (issue 20.5): the engine rows come first in the batch, so
            # their old rows lead the map; the control deltas follow every kept row.
            keep, index = leave_map[:B], leave_index[:B]
            self.stack.select(keep, index)
            self.sampler.select(keep, index)
            if self._decode_phase is not None:
                self._decode_phase = self._decode_phase.select(leave_map)
        else:
            self.stack.update_state([r.request.steering for r in self.rows])
            self.sampler.update_state([r.sampler_row for r in self.rows])
            self._decode_phase = build_phase(
                [control_specs(r.request.steering) for r in self.rows] + [() for _ in owners],
                "generated",
                self.device,
                prompt_lens=[len(r.request.prompt_ids) for r in self.rows + twin_rows],
                triggered=[r.control.watch.fired if r.control and r.control.watch else ()
                           for r in self.rows] + [() for _ in owners],
            )
        self._leave_map = self._leave_index = None
        if not self.sampler.any_rep:
            self.batch.seen = None
        elif self.batch.seen is None:
            # Only after a join: on a leave the presence rows follow the kept rows
            # (BatchState.select), no re-upload. Twins carry their owner's history.
            self.batch.rebuild_seen(
                [list(r.request.prompt_ids) + r.output for r in self.rows + twin_rows]
            )
        self._any_diag = any(r.request.diagnostics != "off" for r in self.rows)
        asked = [r.request.sampling.logprobs for r in self.rows]
        self._logprobs_k = max((k for k in asked if k is not None), default=None)
        self._dirty = False

    # One engine step = sample (device) -> fetch (the one host copy) -> emit (host, per
    # row) -> retire (rows that ended leave the batch) -> decode (the next forward).
    #
    # With overlap (issue 20.6) the decode goes before emit: every row of the step is
    # decoded while the host detokenizes and calls the sinks; a row that ended this step
    # leaves one forward later and that forward's logits for it are dropped by retire
    # (its extra token is never sampled from, let alone emitted).
    def _step(self) -> None:
        if self._dirty:
            self._rebuild()
        out = self._sample()
        copy = self._packer.begin()  # the one device->host copy of this step
        self.steps += 1
        if self._overlap != "off" and not self._watching():
            pending = self._launch_decode(out.tokens)
            try:
                keep = self._emit_all(out, copy.wait())
            finally:  # never leave the forward running into a failure path's reset
                if pending is not None:
                    wait_futures([pending])
            if pending is not None:
                pending.result()  # the forward's own exception, if any, surfaces here
            if len(keep) != len(self.rows):
                self._keep_rows(keep)
            return
        keep = self._emit_all(out, copy.wait())
        tokens = out.tokens
        if len(keep) != len(self.rows):
            index = self._keep_rows(keep)
            if keep:
                # The kept rows lead the leave's uploaded index (twins follow them).
                tokens = tokens.index_select(0, index[: len(keep)])
        if self.rows:
            self._decode(tokens)

    def _watching(self) -> bool:
        """Whether a row waits for an ``after`` marker: emit may then open its window,
        which must reach the very next forward, so that step does not overlap."""
        return any(
            r.control is not None and r.control.watch is not None
            and len(r.control.watch.fired) < len(r.control.watch.markers)
            for r in self.rows
        )

    def _launch_decode(self, tokens: torch.Tensor) -> Future[None] | None:
        """Start the next decode for every current row; None when it ran inline (on
        CUDA the launch returns once the kernels are queued)."""
        if self._overlap == "inline":
            self._decode(tokens)
            return None
        if self._forward_pool is None:
            self._forward_pool = ThreadPoolExecutor(
                1, thread_name_prefix="steer-forward",
                initializer=torch.set_grad_enabled, initargs=(False,))  # as the engine
        return self._forward_pool.submit(self._decode, tokens)

    def _sample(self) -> _StepOutput:
        """Run the processor stack and the sampler on every row's pending logits and
        register what the host needs with the packer (nothing is copied yet)."""
        B = len(self.rows)
        # (B, V) as the (possibly control-steered) forward gave; rows B.. are twins.
        fwd = self.batch.next_logits[:B]
        base = self.twins.base_logits(self.batch.next_logits, B)  # unsteered for twin owners
        aux_logits: dict[str, torch.Tensor] = {}
        if self.aux.active:  # fusion: the auxiliary models' logits of this step
            aux_logits = self.aux.logits([r.handle.key for r in self.rows], len(self.rows))
        ctx = StepContext(base_logits=base, last_tokens=self.batch.last_tokens[:B],
                          want_stats=self._any_diag, aux_logits=aux_logits)
        steered = self.stack.apply(ctx, fwd) if self.stack.active else fwd
        # Hard bans (logit_bias -100) go last, after the sampler's penalties.
        seen = self.batch.seen[:B] if self.batch.seen is not None else None
        tokens = self.sampler.sample(steered, seen, self.stack.bans)  # (B,)
        pack = self._packer
        pack.add("token", tokens)
        # A row whose steered logits hold a NaN or +inf, or are all -inf, has no valid
        # next-token distribution: amax is NaN/+inf/-inf exactly then (one reduction).
        pack.add("nonfinite", ~torch.isfinite(steered.amax(dim=-1)))
        names: list[str] = []
        if self._any_diag:
            stats = step_stats(base, steered, tokens)
            pack.add("diag", stats)
            # Processors' stats, (B, V) tables read at the emitted tokens (NaN = undefined).
            row_stats = ctx.row_stats(tokens)
            names = list(STEP_STAT_NAMES)
            for k in sorted(row_stats):
                pack.add(f"stat:{k}", row_stats[k])
                names.append(k)
        forward_stats = sorted(self.batch.next_stats)
        for k in forward_stats:
            pack.add(f"fwd:{k}", self.batch.next_stats[k][:B])
        if self._logprobs_k is not None:
            # Logprobs only when some row asks: log_softmax of the steered logits, the
            # emitted token's value and the top-k, shipped in the same host transfer.
            lp = steered.float().log_softmax(dim=-1)  # (B, V)
            pack.add("lp", lp.gather(1, tokens.view(-1, 1)))
            top_k = min(self._logprobs_k, self.vocab_size)
            if top_k > 0:
                top = lp.topk(top_k, dim=-1)
                pack.add("lp_top", top.values)
                pack.add("lp_ids", top.indices)
        return _StepOutput(tokens, fwd, steered, ctx, names, forward_stats)

    def _emit_all(self, out: _StepOutput, host: PackedHost) -> list[int]:
        """Record and emit every row's token; return the rows that go on decoding."""
        now = time.monotonic()
        keep: list[int] = []
        diag_names = out.diag_names
        for b, row in enumerate(self.rows):
            if host.value(b, "nonfinite"):
                self._fail_row(row, self._nonfinite_message(b, row, out))
                continue
            token = int(host.value(b, "token"))
            if row.request.diagnostics != "off" and diag_names:
                vals = host.values(b, "diag") + [
                    host.value(b, f"stat:{k}") for k in diag_names[len(STEP_STAT_NAMES):]
                ]
                row.steps.append(dict(zip(diag_names, vals, strict=True)))
            if out.forward_stats:
                # NaN marks a stat that does not apply to this row: leave it out.
                values = {k: host.value(b, f"fwd:{k}") for k in out.forward_stats}
                row.forward_steps.append({k: v for k, v in values.items() if v == v})
            self._advance_row(row, token, now, self._token_logprob(b, row, host))
            if row.finish is None and row.control is not None and row.control.watch:
                for k in row.control.watch.push(row.detok.last_decoded):  # "after" markers
                    if self._decode_phase is not None:
                        self._decode_phase.trigger(b, k, row.control.specs)
            if row.finish is None:
                keep.append(b)
        return keep

    def _token_logprob(self, b: int, row: _Row, host: PackedHost) -> TokenLogprob | None:
        """Row ``b``'s logprob record from the packed copy, if the row asked for one."""
        k = row.request.sampling.logprobs
        if k is None:
            return None
        top: tuple[tuple[int, float], ...] = ()
        if k > 0 and "lp_top" in host:
            values, ids = host.values(b, "lp_top"), host.values(b, "lp_ids")
            top = tuple((int(ids[j]), values[j]) for j in range(min(k, len(values))))
        return TokenLogprob(host.value(b, "lp"), top)

    def _nonfinite_message(self, b: int, row: _Row, out: _StepOutput) -> str:
        """Name the steering entry that made row ``b``'s logits non-finite.

        Runs only for a failed row (rare), so it may replay the stack stage by stage on
        this step's inputs and read the device.
        """
        steering = row.request.steering
        if not bool(torch.isfinite(out.forward[b].amax())):
            inside = [i for i, e in enumerate(steering) if acts_in_forward(e.type)]
            if inside:
                where = ", ".join(f"steering.{i} ('{steering[i].type}')" for i in inside)
                return (f"the model's logits became non-finite (NaN or all -inf) under the "
                        f"control entries {where}; lower their strength")
            return "the model's logits became non-finite (NaN or all -inf)"
        logit_entries = [i for i, e in enumerate(steering) if not acts_in_forward(e.type)]
        logits = out.forward
        for k, stage in enumerate(self.stack.stages):
            for proc in stage:
                logits = proc.apply(out.ctx, logits)
            if not bool(torch.isfinite(logits[b].amax())) and k < len(logit_entries):
                i = logit_entries[k]
                return (f"steering.{i} ('{steering[i].type}') made the logits non-finite "
                        f"(NaN or all -inf); no token can be sampled from them")
        return "the steered logits became non-finite (NaN or all -inf)"

    def _fail_row(self, row: _Row, message: str) -> None:
        """End one row with a 422 error event (its steering made decoding impossible)."""
        row.finish = "error"
        self._observe_finish(row, "error")
        self._emit(row.sink, ErrorEvent(message, type="invalid_request_error", code=422))

    def _decode(self, tokens: torch.Tensor) -> None:
        """Run the next forward for the remaining rows, fed their sampled ``tokens``."""
        if self._dirty:  # rows left: their deltas must leave the decode phase too
            self._rebuild()
        fed = self.twins.feed(tokens)  # (B + J,): twins get their owner's token
        self.batch.append_tokens(fed)
        phase = self._decode_phase
        self.batch.next_logits = self.runner.decode(self.batch, fed, phase)
        stats = getattr(phase, "stats", None)
        self.batch.next_stats = dict(stats) if stats else {}
        if self.aux.active:  # same tokens, each auxiliary model's own rows and cache
            self.aux.decode([r.handle.key for r in self.rows], tokens)

    def _keep_rows(self, keep: Sequence[int]) -> torch.Tensor:
        """Keep only rows ``keep`` (batch order) in every per-row structure; returns the
        kept batch rows' device index (the kept rows, then their twins)."""
        self.rows = [self.rows[b] for b in keep]
        rows = self.twins.select(keep)  # batch rows: the kept rows, then their twins
        # The one upload of a leave: the kept batch rows (the cache, the processors'
        # and the sampler's tables and the sampled tokens are all indexed with it).
        index = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        self.batch.select(rows, index)
        if not self._dirty:
            self._leave_map, self._leave_index = rows, index
        elif self._leave_map is not None and self._leave_index is not None:
            # A second leave before the rebuild: compose (on the device too).
            self._leave_map = [self._leave_map[i] for i in rows]
            self._leave_index = self._leave_index.index_select(0, index)
        self.aux.sync([r.handle.key for r in self.rows])  # frees their aux caches
        self._dirty = True
        return index

    def _reset_batch(self) -> None:
        """Forget every row's device state. Allocates nothing on the device, so it is
        safe after a device-side failure."""
        self.rows = []
        self.batch.clear()
        self.twins.reset()
        self.aux.reset()
        self._decode_phase = None
        self._dirty = True
        self._leave_map = self._leave_index = None

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
            FinishEvent(reason, text, len(row.request.prompt_ids), len(row.output), diag,
                        _receipt(row)),
        )

    def _drop_cancelled(self) -> None:
        """Finish rows whose client went away ("abort") or whose time ran out
        ("timeout"); their batch slots are free for the next admission."""
        now = time.monotonic()
        keep: list[int] = []
        done: list[tuple[_Row, FinishReason, bool]] = []
        for b, r in enumerate(self.rows):
            if r.handle.cancelled:
                done.append((r, "abort", True))
            elif self._expired(r.handle, now):
                done.append((r, "timeout", False))
            else:
                keep.append(b)
        if not done:
            return
        # Free the slots before the FinishEvents go out, so a consumer that sees its
        # request end also sees it gone from ``running`` (test_limits raced here).
        self._keep_rows(keep)
        for r, reason, cancelled in done:
            self._finish(r, reason, cancelled=cancelled)

    def _emit(self, sink: EventSink, event: Any) -> bool:
        """Deliver an event; False if the receiver is gone (its row is then dropped)."""
        try:
            sink(event)
            return True
        except Exception:  # noqa: BLE001 - a dead consumer must not kill the loop
            return False

    def _fail_all(self, new: Sequence[tuple[RequestHandle, EventSink]], message: str) -> None:
        """End every running and just-admitted request with an error event, then drop
        the batch. Host-side only: after a device failure nothing here may touch the
        device (it would raise again and leave clients waiting)."""
        known = {r.handle.key for r in self.rows}
        for r in self.rows:
            self._emit(r.sink, ErrorEvent(message))
            self._guard(self._observe_finish, r, "error")
        for h, sink in new:
            if h.key not in known:
                self._emit(sink, ErrorEvent(message))
                self._guard(self.observer.on_finish, h.request, "error",
                            len(h.request.prompt_ids), 0, 0.0, False)
        self._reset_batch()

    def _guard(self, fn: Any, *args: Any) -> None:
        """Call an observer hook on the failure path; its own failure is only logged."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - the failure path must reach every client
            log.exception("observer failed on the failure path")

    def _abort_everything(self) -> None:
        """Shutdown (or a dead engine): end every running and waiting request."""
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        self.jobs.fail_all(EngineUnavailableError(self.dead or "the engine stopped"))
        reason: FinishReason = "error" if self.dead else "abort"
        # Leave the batch before the FinishEvents go out: a consumer that sees its stream
        # end must also see ``running == 0`` (tests/integration/test_shutdown.py raced here).
        rows = self.rows
        self._reset_batch()
        for row in rows:
            if self.dead:
                self._emit(row.sink, ErrorEvent(self.dead))
                self._guard(self._observe_finish, row, "error")
            else:
                self._guard(self._finish, row, "abort")
        for handle, sink in waiting:
            if self.dead:
                self._emit(sink, ErrorEvent(self.dead, code=503))
                self._guard(self.observer.on_finish, handle.request, reason,
                            len(handle.request.prompt_ids), 0, 0.0, False)
            else:
                self._guard(self._end_waiting, handle, sink, "abort")


def _receipt(row: _Row) -> dict[str, Any] | None:
    """The steering receipt of a row with control entries, from the per-forward stats
    its hooks recorded (prefill and every decode step; None without control entries)."""
    if row.control is None:
        return None
    return summarize_receipt(row.forward_steps, row.control.specs, row.control.indices)


@dataclass
class _StepOutput:
    """The device side of one step, between sampling and the next forward.

    Attributes:
        tokens: ``(B,)`` int64 sampled tokens.
        forward: ``(B, V)`` the forward's logits the stack started from.
        steered: ``(B, V)`` the steered logits the sampler used.
        ctx: the step's processor context (replayed to name a non-finite entry).
        diag_names: diagnostics column names (empty when no row asked).
        forward_stats: names of the forward's per-row stats shipped this step.
    """

    tokens: torch.Tensor
    forward: torch.Tensor
    steered: torch.Tensor
    ctx: StepContext
    diag_names: list[str]
    forward_stats: list[str]
