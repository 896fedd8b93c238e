"""docs/configuration.md's settings tables are the fields' own descriptions (core/settings_table.py)."""

import os

import pytest

from mergekit_dam.core.settings import DamSettings, ModelSettings
from mergekit_dam.core.settings_table import DOC, DOC_TABLES, doc_tables, settings_table, update_doc_tables

PAGE = os.path.join(os.path.dirname(__file__), "..", "..", DOC)


def test_doc_settings_tables_are_generated_from_the_fields():
    """docs/configuration.md's Settings tables are `settings_table` output, one row per setting
    (regenerate, from the repository root: python -c "from mergekit_dam.core.settings_table
    import update_doc_tables; update_doc_tables()")."""
    with open(PAGE, encoding="utf-8") as handle:
        text = handle.read()
    lines = text.split("\n")
    tables = ["\n".join(lines[first:stop]) for first, stop in doc_tables(text)]
    assert tables == [settings_table(ModelSettings), settings_table(DamSettings)]
    assert [settings_table(model) for model in DOC_TABLES] == tables
    for model, table in zip(DOC_TABLES, tables):
        names = [row.split("|")[1].strip().strip("`") for row in table.split("\n")[2:]]
        assert names == list(model.model_fields)


def test_update_rewrites_a_stale_table(tmp_path):
    page = tmp_path / "configuration.md"
    stale = "| name | default | description |\n|---|---|---|\n| `dataset` | `\"\"` | old words |"
    page.write_text(f"# Configuration\n\n## Settings\n\n{stale}\n\nText.\n\n{stale}\n\n## Next\n\n| a |\n", encoding="utf-8")
    update_doc_tables(str(page))
    text = page.read_text(encoding="utf-8")
    assert settings_table(ModelSettings) in text and settings_table(DamSettings) in text and "old words" not in text
    assert text.endswith("## Next\n\n| a |\n")  # a table after the section is not touched
    page.write_text("## Settings\n\none table only:\n\n" + stale, encoding="utf-8")
    with pytest.raises(ValueError, match="expected 2 tables"):
        update_doc_tables(str(page))


def test_settings_table_rows():
    table = settings_table(DamSettings).split("\n")
    assert table[:2] == ["| name | default | description |", "|---|---|---|"]
    assert "| `steps` | unset | optimizer steps" in "\n".join(table)
    assert "| `retrain` | `false` | " in "\n".join(table) and "| `lr` | `auto` | " in "\n".join(table)
    assert settings_table(ModelSettings).split("\n")[2].startswith('| `dataset` | `""` | ')
