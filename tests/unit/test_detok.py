"""Incremental detokenization and stop strings with the byte-level tiny tokenizer."""

from __future__ import annotations

from server.engine.detok import IncrementalDetokenizer
from server.tiny import tiny_tokenizer

TOK = tiny_tokenizer()


def run(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], str, bool]:
    ids = TOK(text)["input_ids"]
    d = IncrementalDetokenizer(TOK, TOK("prompt")["input_ids"], stop)
    deltas = [d.push(t) for t in ids]
    deltas.append(d.finish())
    return deltas, "".join(deltas), d.stopped


def test_multibyte_characters_are_never_split():
    deltas, text, _ = run("héllo wörld ✓ 日本")
    assert text == "héllo wörld ✓ 日本"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 5  # continuation bytes wait for their character


def test_stop_string_truncates_and_is_held_back():
    deltas, text, stopped = run("abc STOP def", stop=("STOP",))
    assert stopped and text == "abc "
    # Nothing after the stop string was ever emitted.
    assert "S" not in "".join(deltas)


def test_partial_stop_prefix_is_released_when_not_a_stop():
    _, text, stopped = run("a ST b", stop=("STOP",))
    assert not stopped and text == "a ST b"


def test_stop_across_tokens_and_earliest_wins():
    _, text, stopped = run("xx<end>yy##", stop=("##", "<end>"))
    assert stopped and text == "xx"
