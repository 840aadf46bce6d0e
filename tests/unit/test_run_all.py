"""benchmarks/run_all.py regenerates the dashboard but keeps its hand-written section."""

from __future__ import annotations

from benchmarks.run_all import HAND_BEGIN, HAND_END, compose


def test_hand_written_section_survives_regeneration() -> None:
    analysis = f"{HAND_BEGIN}\n## Reading\n\nA person wrote this.\n{HAND_END}"
    old = f"# Performance dashboard\n\nold table\n\n{analysis}\n\n## Outputs\n\nold output\n"
    new = compose("# Performance dashboard\n\nnew table", "## Outputs\n\nnew output", old)
    assert "new table" in new and "new output" in new
    assert "old table" not in new and "old output" not in new
    assert analysis in new
    assert new.index("new table") < new.index(analysis) < new.index("new output")
    # Regenerating again keeps exactly one copy.
    again = compose("# Performance dashboard\n\nnewer", "## Outputs\n\nnewest", new)
    assert again.count(HAND_BEGIN) == 1 and analysis in again


def test_first_run_without_a_previous_file() -> None:
    new = compose("head", "tail", "")
    assert new == "head\n\ntail\n"
