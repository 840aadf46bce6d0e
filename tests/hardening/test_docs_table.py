"""docs/hardening.md's limits table states the settings' real defaults."""

from __future__ import annotations

import re
from pathlib import Path

from server.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "hardening.md"


def test_every_row_names_a_setting_with_its_default() -> None:
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", DOC.read_text(), flags=re.M)
    assert len(rows) >= 10
    fields = Settings.model_fields
    defaults = Settings()
    for name, default in rows:
        assert name in fields, name
        actual = getattr(defaults, name)
        if default.strip() == "model context":
            assert actual is None, name
        else:
            assert str(actual) == default.strip(), (name, actual, default)
