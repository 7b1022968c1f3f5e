"""The docs that are generated from the code say what the code does."""

from __future__ import annotations

from pathlib import Path

from armor_modifier.core.distill_settings import distillation_table
from armor_modifier.core.options import settings_table

DOCS = Path(__file__).parents[1] / "docs"


def test_settings_table_matches_the_settings_objects():
    text = (DOCS / "settings.md").read_text()
    start = text.index("<!-- settings table: generated -->\n") + len(
        "<!-- settings table: generated -->\n"
    )
    end = text.index("<!-- end of the generated table -->")
    assert text[start:end].strip() == settings_table().strip()
    start = text.index("<!-- distillation table: generated -->\n")
    end = text.index("<!-- end of the distillation table -->")
    assert text[start:end].split("\n", 1)[1].strip() == distillation_table().strip()
