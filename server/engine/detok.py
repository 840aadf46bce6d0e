"""Incremental detokenization and stop-sequence matching, one instance per request.

Decoding the whole output every step is O(n²); decoding only the newest token breaks
multi-byte characters and tokenizers that merge spaces. We decode a short window:
``tokens[prefix:read]`` is text already emitted, ``tokens[prefix:]`` the same window
plus the new tokens; the difference is the new text, held back while it ends in an
incomplete UTF-8 sequence (``\\ufffd``). The window starts inside the prompt so that
the first generated token gets its leading space right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROMPT_CONTEXT = 4


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas and applies stop strings.

    ``push(token)`` returns the text that became final; ``finish()`` flushes the rest.
    With stop strings, text that might be the start of a stop string is held back
    until it is known not to be; when a stop string appears, ``stopped`` becomes True
    and the output ends just before it.
    """

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = tuple(s for s in stop if s)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # all final text (after stop truncation)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(prefix_text) :]
        return ""

    def push(self, token: int) -> str:
        """Add one generated token; return newly final text (possibly '')."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text += self._advance()
        return self._release()

    def _release(self, final: bool = False) -> str:
        if self.stop:
            # Only the tail can contain a new stop string.
            start = max(0, self.sent - self.max_stop)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text)
        if self.stop and not final:
            end -= self._held_back()
        end = max(end, self.sent)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
        best = 0
        tail = self.text[-self.max_stop :] if self.max_stop else ""
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def finish(self) -> str:
        """Flush everything still held back (including a trailing partial character)."""
        if not self.stopped:
            full = self._decode(self.ids[self.prefix :])
            prefix_text = self._decode(self.ids[self.prefix : self.read])
            if len(full) > len(prefix_text):
                self.text += full[len(prefix_text) :]
                self.prefix = self.read = len(self.ids)
        return self._release(final=True)
