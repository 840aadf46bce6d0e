"""Stop strings: linear-time matching (structural count) and equality with a brute-force
oracle over random texts, stops and token splits."""

from __future__ import annotations

import random
from typing import Any

from server.engine.detok import IncrementalDetokenizer, StopMatcher


class CountingStr(str):
    """A stop string that counts the characters of every index or slice taken of it:
    the characters the matcher looked at (a slice compared with ``endswith`` costs its
    length, an index one)."""

    touched = 0

    def __getitem__(self, key: Any) -> str:
        out = str.__getitem__(self, key)
        CountingStr.touched += len(out)
        return out


class CharTokenizer:
    """One token per character (id = code point): decode is exact, so the detokenizer's
    output can be compared with plain string operations."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def run(text: str, stops: list[str], chunks: list[int] | None = None) -> tuple[str, bool]:
    d = IncrementalDetokenizer(CharTokenizer(), [ord("p")], stops)
    out = [d.push(ord(c)) for c in text]
    out.append(d.finish())
    # Nothing is ever emitted past what the oracle allows (checked by the caller).
    return "".join(out), d.stopped


def oracle(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut before the stop occurrence that ends first; ties: the one starting first."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0:
            key = (i + len(s), i)
            best = key if best is None or key < best else best
    if best is None:
        return text, False
    # Among all stops, the earliest start of any occurrence that ends by best end.
    end = best[0]
    start = min(i for s in stops if 0 <= (i := text.find(s)) and i + len(s) <= end)
    return text[:start], True


def test_matches_the_brute_force_oracle() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        alphabet = "ab" if rng.random() < 0.7 else "abc"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                 for _ in range(rng.randint(1, 3))]
        assert run(text, stops) == oracle(text, stops), (text, stops)


def test_held_back_text_is_exactly_a_possible_stop_prefix() -> None:
    rng = random.Random(3)
    for _ in range(500):
        text = "".join(rng.choice("xy") for _ in range(20))
        stops = ["".join(rng.choice("xy") for _ in range(rng.randint(2, 5)))]
        d = IncrementalDetokenizer(CharTokenizer(), [ord("p")], stops)
        sent = ""
        for i, c in enumerate(text):
            sent += d.push(ord(c))
            if d.stopped:
                break
            seen = text[: i + 1]
            held = seen[len(sent):]
            assert seen.startswith(sent)
            # The held-back text is the longest suffix that begins a stop string.
            longest = max((k for s in stops for k in range(1, len(s))
                           if seen.endswith(s[:k])), default=0)
            assert len(held) == longest, (seen, stops, sent)


def test_stop_matching_touches_linear_characters() -> None:
    # The attack: long stops that almost match, fed one character at a time.
    # The old check compared every suffix of the held-back tail with every prefix of
    # every stop: O(stop length²) per token.
    L, n_tokens, n_stops = 256, 2000, 8
    stops = [CountingStr("a" * (L - 1) + chr(ord("b") + i)) for i in range(n_stops)]
    CountingStr.touched = 0
    d = IncrementalDetokenizer(CharTokenizer(), [ord("p")], stops)
    for _ in range(n_tokens):
        d.push(ord("a"))
    d.finish()
    # KMP: each character moves each matcher forward once and back at most as often.
    assert CountingStr.touched <= 4 * n_stops * (n_tokens + L), CountingStr.touched


def test_matcher_state_is_the_kmp_prefix_function() -> None:
    m = StopMatcher("abab")
    assert m.fail == [0, 0, 1, 2]
    assert m.feed("aba") == -1 and m.state == 3
    assert m.feed("b") == 1
