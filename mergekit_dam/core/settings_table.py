"""The settings tables of docs/configuration.md, made from the settings' `Field` descriptions (a
test keeps them equal; `update_doc_tables` rewrites them after a description changes)."""

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
    per field, in field order (docs/configuration.md's Settings section shows these)."""
    rows = ["| name | default | description |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        description = " ".join(field.description.split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_default_text(field.default)} | {description} |")
    return "\n".join(rows)


DOC = "docs/configuration.md"  # the page that holds the tables, from the repository root
DOC_SECTION = "## Settings"  # the section of DOC that holds them, each table in DOC_TABLES' order
DOC_TABLES: Tuple[type[BaseModel], ...] = (ModelSettings, DamSettings)


def doc_tables(text: str) -> List[Tuple[int, int]]:
    """(first, last + 1) line numbers of each markdown table in the `## Settings` section
    of docs/configuration.md's `text` (up to the next `## ` heading)."""
    lines = text.split("\n")
    start = lines.index(DOC_SECTION)
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


def update_doc_tables(path: str = DOC) -> None:
    """Rewrite docs/configuration.md's settings tables from the fields (after editing a
    description); run from the repository root, or pass the page's path."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    spans = doc_tables(text)
    if len(spans) != len(DOC_TABLES):
        raise ValueError(f"{path}: expected {len(DOC_TABLES)} tables under {DOC_SECTION}, found {len(spans)}")
    lines = text.split("\n")
    for (first, stop), model in reversed(list(zip(spans, DOC_TABLES))):
        lines[first:stop] = settings_table(model).split("\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
