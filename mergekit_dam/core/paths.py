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


def dataset_file_problem(dataset: str, model: str):
    """The one-line error for a local `dataset` path that is not a readable file (naming what
    the path is: missing, a directory, unreadable, and the fix), or None when it is one."""
    path = resolve_path(dataset)
    where = f"dam: dataset {dataset} (model {model})"
    if not os.path.exists(path):
        return f"{where} does not exist; fix the path"
    if os.path.isdir(path):
        return (f"{where} is a directory, not a file; give one of its {'/'.join(sorted(LOCAL_BUILDERS))} files "
                "(or a Hugging Face dataset id)")
    if not os.access(path, os.R_OK):
        return f"{where} cannot be read (permission denied); make it readable or copy it somewhere readable"
    return None
