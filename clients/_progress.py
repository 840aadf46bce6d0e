"""A progress bar for long sweeps: tqdm when it is installed and stderr is a terminal,
otherwise nothing (so logs and CI output stay clean)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


class Progress:
    """``with Progress(total, "sweep") as p: p.update(1)``; silent when not applicable."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None) -> None:
        self._bar: Any = None
        if enabled is None:
            enabled = total > 1 and _stderr_is_tty()
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit="gen", leave=False)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished generations."""
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
