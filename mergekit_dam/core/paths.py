"""Paths the user gives (artifacts, datasets, warm starts), read the way mergekit reads a
local model path."""

from __future__ import annotations

import os

# local dataset files by extension, with the `datasets` builder that reads each
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def resolve_path(path: str) -> str:
    """`~` expanded, relative to the working directory of the run."""
    return os.path.abspath(os.path.expanduser(path))


def is_local(dataset: str) -> bool:
    """A local file (existing, or named like one); anything else is a Hugging Face dataset id."""
    path = resolve_path(dataset)
    return os.path.exists(path) or os.path.splitext(dataset)[1].lower() in LOCAL_BUILDERS or dataset.startswith((".", "/", "~"))
