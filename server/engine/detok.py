"""Incremental detokenization and stop-sequence matching, one instance per request.

Decoding the whole output every step is O(n²); decoding only the newest token breaks
multi-byte characters and tokenizers that merge spaces. We decode a short window:
``tokens[prefix:read]`` is text already emitted, ``tokens[prefix:]`` the same window
plus the new tokens; the difference is the new text, held back while it ends in an
incomplete UTF-8 sequence (``\\ufffd``). The window starts inside the prompt so that
the first generated token gets its leading space right.

Stop strings are matched incrementally (:class:`StopMatcher`, Knuth-Morris-Pratt): every
generated character is looked at a constant amortized number of times per stop string,
and the held-back length is the matcher's state, so a request with long stop strings
costs the engine thread O(output + stop length), never O(output × stop length²).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROMPT_CONTEXT = 4


class StopMatcher:
    """Incremental occurrence search for one stop string (Knuth-Morris-Pratt).

    ``state`` is the length of the longest prefix of ``pattern`` that is a suffix of the
    text fed so far: exactly the text that must be held back in case the stop string
    completes. ``feed(text)`` returns the offset in ``text`` just past the first complete
    occurrence, or -1. Time: O(len(text)) amortized per call, O(len(pattern)) to build.
    """

    def __init__(self, pattern: str) -> None:
        if not pattern:
            raise ValueError("empty stop string")
        self.pattern = pattern
        # fail[i]: length of the longest proper prefix of pattern[: i + 1] that is also
        # its suffix (the classic prefix function).
        fail = [0] * len(pattern)
        k = 0
        for i in range(1, len(pattern)):
            ch = pattern[i]
            while k and pattern[k] != ch:
                k = fail[k - 1]
            if pattern[k] == ch:
                k += 1
            fail[i] = k
        self.fail = fail
        self.state = 0

    def feed(self, text: str) -> int:
        """Advance over ``text``; the end offset of the first full match in it, or -1."""
        pattern, fail, k, n = self.pattern, self.fail, self.state, len(self.pattern)
        for i, ch in enumerate(text):
            while k and pattern[k] != ch:
                k = fail[k - 1]
            if pattern[k] == ch:
                k += 1
            if k == n:
                self.state = k
                return i + 1
        self.state = k
        return -1


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas and applies stop strings.

    ``push(token)`` returns the text that became final; ``finish()`` flushes the rest.
    With stop strings, text that might be the start of a stop string is held back
    until it is known not to be; when a stop string appears, ``stopped`` becomes True
    and the output ends just before it (the earliest-starting one when several complete
    in the same step).
    """

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.matchers = [StopMatcher(s) for s in stop if s]
        self.pending = ""  # decoded text not yet returned (held back or new)
        self.stopped = False
        # Text the latest push decoded, before stop matching holds any back (control
        # vectors' "after" markers watch the generated text through it).
        self.last_decoded = ""

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
        self.last_decoded = self._advance()
        return self._release(self.last_decoded)

    def _release(self, new: str, final: bool = False) -> str:
        """Append ``new`` to the pending text; return what is now final."""
        held = len(self.pending)
        text = self.pending + new  # short: held-back text (< longest stop) + one delta
        if self.matchers and new:
            cut = -1
            for m in self.matchers:
                end = m.feed(new)
                if end >= 0:
                    # >= 0: a partial match never extends past the held-back text.
                    start = held + end - len(m.pattern)
                    cut = start if cut < 0 else min(cut, start)
            if cut >= 0:
                self.stopped = True
                self.pending = ""
                return text[:cut]
        if final or not self.matchers:
            self.pending = ""
            return text
        keep = max(m.state for m in self.matchers)  # a stop string may be starting here
        keep = min(keep, len(text))
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        """Flush everything still held back (including a trailing partial character)."""
        if self.stopped:
            return ""
        full = self._decode(self.ids[self.prefix :])
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new = ""
        if len(full) > len(prefix_text):
            new = full[len(prefix_text) :]
            self.prefix = self.read = len(self.ids)
        return self._release(new, final=True)
