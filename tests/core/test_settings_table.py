"""The README's settings tables are the fields' own descriptions (core/settings_table.py)."""

from mergekit_dam.core.settings import DamSettings, ModelSettings
from mergekit_dam.core.settings_table import README_TABLES, readme_tables, settings_table


def test_readme_settings_tables_are_generated_from_the_fields():
    """README.md's Configuration tables are `settings_table` output, one row per setting
    (regenerate: python -c "from mergekit_dam.core.settings_table import update_readme_tables; update_readme_tables('README.md')")."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    lines = text.split("\n")
    tables = ["\n".join(lines[first:stop]) for first, stop in readme_tables(text)]
    assert tables == [settings_table(ModelSettings), settings_table(DamSettings)]
    assert [settings_table(model) for model in README_TABLES] == tables
    for model, table in zip(README_TABLES, tables):
        names = [row.split("|")[1].strip().strip("`") for row in table.split("\n")[2:]]
        assert names == list(model.model_fields)


def test_settings_table_rows():
    table = settings_table(DamSettings).split("\n")
    assert table[:2] == ["| name | default | description |", "|---|---|---|"]
    assert "| `steps` | unset | optimizer steps" in "\n".join(table)
    assert "| `retrain` | `false` | " in "\n".join(table) and "| `lr` | `auto` | " in "\n".join(table)
    assert settings_table(ModelSettings).split("\n")[2].startswith('| `dataset` | `""` | ')
