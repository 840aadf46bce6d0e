"""The step's single device→host copy: named columns packed into one float64 tensor.

Everything the host needs from a decode step — the sampled tokens, the non-finite flags,
diagnostics stats, logprobs, per-row scalars recorded by control-vector hooks — is
registered as named ``(B,)`` or ``(B, k)`` columns, concatenated on the device and copied
once. On CUDA the copy goes into a pinned host buffer with ``non_blocking=True`` and the
host waits on one event; on the CPU it is a plain copy. Token ids travel as float64,
which is exact for ids below 2**53.

Readers look columns up by name (``PackedHost.value(b, "token")``), so nothing depends
on index arithmetic over a host row.
"""

from __future__ import annotations

import torch


class HostPacker:
    """Collects the columns of one step, then copies them to the host at once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cols: list[torch.Tensor] = []
        self._layout: dict[str, tuple[int, int]] = {}  # name -> (first column, width)
        self._width = 0
        self._pinned: torch.Tensor | None = None  # reused pinned buffer (CUDA only)

    def add(self, name: str, values: torch.Tensor) -> None:
        """Register ``values`` — ``(B,)`` or ``(B, k)`` — under ``name``."""
        col = values.reshape(values.shape[0], -1).to(torch.float64)
        self._layout[name] = (self._width, col.shape[1])
        self._width += col.shape[1]
        self._cols.append(col)

    def fetch(self) -> PackedHost:
        """Copy every registered column to the host (the one sync) and reset."""
        return self.begin().wait()

    def begin(self) -> PendingCopy:
        """Start the copy of every registered column and reset; the host data is ready
        after :meth:`PendingCopy.wait`. On CUDA the copy is queued (pinned buffer,
        ``non_blocking``) ahead of whatever the caller launches next — the next decode
        then runs while the host waits only for this copy; on the CPU it is done here."""
        packed = torch.cat(self._cols, dim=1) if len(self._cols) > 1 else self._cols[0]
        layout = dict(self._layout)
        self._cols, self._layout, self._width = [], {}, 0
        if packed.device.type != "cuda":
            return PendingCopy(layout, rows=packed.tolist())
        shape = tuple(packed.shape)
        if self._pinned is None or tuple(self._pinned.shape) != shape:
            self._pinned = torch.empty(shape, dtype=packed.dtype, pin_memory=True)
        host = self._pinned
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingCopy(layout, host=host, done=done)


class PendingCopy:
    """One step's packed copy in flight (see :meth:`HostPacker.begin`)."""

    def __init__(self, layout: dict[str, tuple[int, int]], rows: list[list[float]] | None = None,
                 host: torch.Tensor | None = None, done: torch.cuda.Event | None = None) -> None:
        self._layout, self._rows, self._host, self._done = layout, rows, host, done

    def wait(self) -> PackedHost:
        """Block until the copy has landed (CUDA: on its event only) and read it."""
        if self._rows is None:
            assert self._host is not None and self._done is not None
            self._done.synchronize()
            self._rows = self._host.tolist()
        return PackedHost(self._rows, self._layout)


class PackedHost:
    """The host side of one step's packed copy, read by column name."""

    def __init__(self, rows: list[list[float]], layout: dict[str, tuple[int, int]]) -> None:
        self.rows = rows
        self.layout = layout

    def __contains__(self, name: str) -> bool:
        return name in self.layout

    def value(self, b: int, name: str) -> float:
        """Row ``b``'s scalar column ``name``."""
        first, _ = self.layout[name]
        return self.rows[b][first]

    def values(self, b: int, name: str) -> list[float]:
        """Row ``b``'s columns ``name`` (width ``k``)."""
        first, width = self.layout[name]
        return self.rows[b][first : first + width]


__all__ = ["HostPacker", "PackedHost", "PendingCopy"]
