"""The README's settings tables, made from the settings' `Field` descriptions (a test
keeps them equal; `update_readme_tables` rewrites them after a description changes)."""

from __future__ import annotations

from typing import Any, List, Tuple

from pydantic import BaseModel

from mergekit_dam.core.settings import DamSettings, ModelSettings


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value}`"


def settings_table(model: type[BaseModel]) -> str:
    """The markdown table of a settings class: one row `| name | default | description |`
    per field, in field order (README.md's Configuration section shows these)."""
    rows = ["| name | default | description |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        description = " ".join(field.description.split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_default_text(field.default)} | {description} |")
    return "\n".join(rows)


README_TABLES: Tuple[type[BaseModel], ...] = (ModelSettings, DamSettings)  # their order in README.md


def readme_tables(text: str) -> List[Tuple[int, int]]:
    """(first, last + 1) line numbers of each markdown table in the README's
    `## Configuration` section."""
    lines = text.split("\n")
    start = lines.index("## Configuration")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    spans: List[Tuple[int, int]] = []
    index = start
    while index < end:
        if lines[index].startswith("|"):
            first = index
            while index < end and lines[index].startswith("|"):
                index += 1
            spans.append((first, index))
        index += 1
    return spans


def update_readme_tables(path: str) -> None:
    """Rewrite the README's settings tables from the fields (after editing a description)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    spans = readme_tables(text)
    if len(spans) != len(README_TABLES):
        raise ValueError(f"{path}: expected {len(README_TABLES)} tables under ## Configuration, found {len(spans)}")
    lines = text.split("\n")
    for (first, stop), model in reversed(list(zip(spans, README_TABLES))):
        lines[first:stop] = settings_table(model).split("\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
