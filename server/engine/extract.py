"""Control-vector extraction forwards as engine jobs, run between decode steps.

Extraction reads every chosen block's output at the last token of many prompts (the
states ``processors.control.fit_layers`` fits directions to). Those forwards run on the
engine thread, like every other forward of the served model, so one loop owns the
model: a job is submitted through :meth:`server.engine.Engine.submit_job` (bounded by
the same ``max_queue`` as requests, so a full queue is the same ``QueueFullError``),
waits in a :class:`JobQueue`, and the engine runs **one chunk** of the head job after
each step — a running generation keeps decoding between an extraction's chunks, and
its tokens do not change (the chunk's forward uses no cache and no steering, and the
hooks' capture state is set only for that forward).

A job is cancellable: its ``cancel`` event (the HTTP layer's build-cancel event, set on
client disconnect or ``build_timeout_s``) is checked before every chunk, so a cancelled
job that has not started never runs a forward, and one that has stops before its next
chunk. Its :class:`concurrent.futures.Future` then raises :class:`JobCancelled`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.hooks import ControlHooks
from server.engine.padding import attention_mask_4d, left_pad, model_takes_4d_mask

EXTRACT_BATCH = 16  # texts per forward (at most; the prefill token budget may lower it)


class JobCancelled(Exception):
    """The job was cancelled (or abandoned) before it finished; nothing was kept."""


def chunk_size(prompts: Sequence[Sequence[int]], start: int, batch_size: int,
               max_tokens: int) -> int:
    """How many prompts from ``start`` one forward takes: at most ``batch_size``, and
    no more than fit ``max_tokens`` once left-padded to the chunk's longest (always at
    least one, so a long prompt still runs)."""
    n, longest = 0, 0
    for p in prompts[start : start + batch_size]:
        longest = max(longest, len(p))
        if n and (n + 1) * longest > max_tokens:
            break
        n += 1
    return max(1, n)


@torch.inference_mode()
def last_token_states_chunk(
    model: Any, hooks: ControlHooks, prompts: Sequence[Sequence[int]], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """One forward of ``prompts`` (left-padded, explicit mask, positions from the mask
    so padding never shifts them): each of ``layers``' block output at the last token,
    layer → ``(N, D)`` float32 on the host."""
    param = next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    padded = left_pad(prompts, param.device)
    # Always the 4-D mask (no cache here, so a None mask would make transformers
    # inspect the position ids on the host); no query row is fully masked.
    mask: torch.Tensor = padded.mask
    if model_takes_4d_mask(model.config):
        mask = attention_mask_4d(padded.mask, padded.mask.shape[1], dtype)
    with hooks.capture(layers) as states:
        model(input_ids=padded.ids, attention_mask=mask, position_ids=padded.positions,
              use_cache=False, logits_to_keep=1)
    return {layer: states[layer].cpu() for layer in layers}


@dataclass(eq=False)
class ExtractionJob:
    """Last-token states of ``prompts`` at ``layers``, computed chunk by chunk.

    Attributes:
        prompts: token ids per prompt (each at least one token).
        layers: 0-based block indices to record.
        batch_size: most prompts per forward.
        cancel: set to abandon the job (checked before every chunk).
        result: resolves to layer → ``(N, D)`` float32 (prompt order), or raises
            :class:`JobCancelled`, the engine's error, or the forward's exception.
        chunks_run: forwards run so far (observability, tests).
    """

    prompts: list[list[int]]
    layers: tuple[int, ...]
    batch_size: int = EXTRACT_BATCH
    cancel: threading.Event = field(default_factory=threading.Event)
    result: Future[dict[int, torch.Tensor]] = field(default_factory=Future)
    chunks_run: int = 0
    _next: int = 0
    _parts: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    @property
    def finished(self) -> bool:
        """Every prompt has run."""
        return self._next >= len(self.prompts)

    def run_chunk(self, model: Any, hooks: ControlHooks, max_tokens: int) -> None:
        """Run the next chunk (engine thread); resolve ``result`` after the last one."""
        n = chunk_size(self.prompts, self._next, self.batch_size, max_tokens)
        part = last_token_states_chunk(model, hooks, self.prompts[self._next : self._next + n],
                                       self.layers)
        self._next += n
        self.chunks_run += 1
        for layer, states in part.items():
            self._parts.setdefault(layer, []).append(states)
        if self.finished:
            self.result.set_result(
                {layer: torch.cat(self._parts[layer], dim=0) for layer in self.layers}
            )
            self._parts = {}

    def wait(self) -> dict[int, torch.Tensor]:
        """Block (off the engine thread) until the job resolves; its outcome."""
        return self.result.result()


class JobQueue:
    """The engine's waiting jobs (thread-safe; the engine bounds its length)."""

    def __init__(self) -> None:
        self._jobs: deque[ExtractionJob] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._jobs)

    def push(self, job: ExtractionJob) -> None:
        with self._lock:
            self._jobs.append(job)

    def drop_cancelled(self) -> None:
        """Resolve and remove every cancelled job, so its queue slot frees at once."""
        with self._lock:
            gone = [j for j in self._jobs if j.cancelled]
            if gone:
                self._jobs = deque(j for j in self._jobs if not j.cancelled)
        for job in gone:
            job.result.set_exception(JobCancelled())

    def run_next(
        self,
        model: Any,
        hooks: ControlHooks,
        max_tokens: int,
        fatal: Callable[[BaseException], bool],
    ) -> None:
        """Run one chunk of the head job (engine thread, between steps).

        A job's own failure resolves its ``result`` with the exception and leaves the
        engine running; one that ``fatal`` calls a device failure is re-raised too, so
        the engine stops as it does for a failed step."""
        self.drop_cancelled()
        with self._lock:
            if not self._jobs:
                return
            job = self._jobs[0]
        try:
            job.run_chunk(model, hooks, max_tokens)
        except Exception as exc:
            self._pop(job)
            job.result.set_exception(exc)
            if fatal(exc):
                raise
            return
        if job.finished:
            self._pop(job)

    def _pop(self, job: ExtractionJob) -> None:
        with self._lock:
            if self._jobs and self._jobs[0] is job:
                self._jobs.popleft()

    def fail_all(self, exc: BaseException) -> None:
        """Resolve every waiting job with ``exc`` (the engine stops)."""
        with self._lock:
            jobs, self._jobs = list(self._jobs), deque()
        for job in jobs:
            if not job.result.done():
                job.result.set_exception(exc)


__all__ = [
    "EXTRACT_BATCH",
    "ExtractionJob",
    "JobCancelled",
    "JobQueue",
    "chunk_size",
    "last_token_states_chunk",
]
