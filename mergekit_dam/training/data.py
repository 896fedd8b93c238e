"""Each expert's calibration data: load, render to text, tokenise, batch.

A model's `dataset` is a local file (.jsonl/.json/.parquet/.csv/.txt) or a Hugging Face
dataset id (with `dataset_config`, `dataset_split`), loaded with `datasets`. Records
are rendered to text in this order of preference:
  1. the `text_field` (default `text`) when it holds a string;
  2. chat `messages` (a list of {role, content}), through the tokenizer's chat template;
  3. prompt/response pairs (`prompt` + `response`, or `prompt` + `completion`), as
     "{prompt}\\n{response}".
Shuffled with the seed, the first `samples` kept, truncated to `max_length` tokens.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

import torch

from mergekit_dam.plugin.config import DamError, ModelSettings, resolve_path

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
PAIR_FIELDS = (("prompt", "response"), ("prompt", "completion"))


def is_local(dataset: str) -> bool:
    """A local file (existing, or named like one); anything else is a Hugging Face dataset id."""
    path = resolve_path(dataset)
    return os.path.exists(path) or os.path.splitext(dataset)[1].lower() in LOCAL_BUILDERS or dataset.startswith((".", "/", "~"))


def load_records(settings: ModelSettings, model: str):
    """The raw `datasets.Dataset` for one model."""
    import datasets

    datasets.disable_progress_bars()  # per-file "Generating split" bars are noise here
    name = settings.dataset
    try:
        if is_local(name):
            path = resolve_path(name)
            builder = LOCAL_BUILDERS.get(os.path.splitext(path)[1].lower())
            if not os.path.isfile(path):
                raise DamError(f"dam: dataset file {path} (model {model}) does not exist; fix the path")
            if builder is None:
                raise DamError(
                    f"dam: dataset {path} (model {model}) has an unsupported extension; "
                    f"use one of {', '.join(sorted(LOCAL_BUILDERS))}"
                )
            if os.path.getsize(path) == 0:
                raise DamError(f"dam: dataset {path} (model {model}) is empty; give it examples or remove it")
            records = datasets.load_dataset(builder, data_files=path, split="train")
        else:
            records = datasets.load_dataset(name, name=settings.dataset_config or None, split=settings.dataset_split)
    except DamError:
        raise
    except Exception as error:  # datasets wraps causes in its own errors; report the root one
        cause = error
        while cause.__cause__ is not None or (cause.__context__ is not None and not cause.__suppress_context__):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            raise DamError(f"dam: dataset {name} (model {model}) is not UTF-8 text ({cause.reason}); re-encode it as UTF-8") from None
        raise DamError(f"dam: cannot load dataset {name} for model {model}: {type(cause).__name__}: {cause}") from None
    if len(records) == 0:
        raise DamError(f"dam: dataset {name} (model {model}) is empty; give it examples or remove it")
    return records


def render(record: Dict[str, Any], settings: ModelSettings, tokenizer, model: str) -> str:
    if isinstance(record.get(settings.text_field), str):
        return record[settings.text_field]
    if isinstance(record.get("messages"), list):
        if not getattr(tokenizer, "chat_template", None):
            raise DamError(
                f"dam: dataset {settings.dataset} (model {model}) has chat `messages` but the tokenizer has no "
                "chat template; set `chat_template:` in the config or give the records a text field"
            )
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    for prompt, response in PAIR_FIELDS:
        if isinstance(record.get(prompt), str) and isinstance(record.get(response), str):
            return f"{record[prompt]}\n{record[response]}"
    raise DamError(
        f"dam: dataset {settings.dataset} (model {model}) records have no `{settings.text_field}` text, "
        f"`messages` or prompt/response fields (found: {', '.join(sorted(record))}); set `text_field`"
    )


def tokenize(
    settings: ModelSettings, tokenizer, model: str, *, samples: int, max_length: int, seed: int
) -> List[List[int]]:
    """Token ids of up to `samples` shuffled examples, each at most `max_length` long."""
    records = load_records(settings, model).shuffle(seed=seed)
    sequences = []
    for record in records.select(range(min(samples, len(records)))):
        ids = tokenizer(render(record, settings, tokenizer, model), truncation=True, max_length=max_length)["input_ids"]
        if ids:
            sequences.append(list(ids))
    if not sequences:
        raise DamError(f"dam: dataset {settings.dataset} (model {model}) has no text after tokenisation")
    return sequences


def collate(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded input ids and the attention mask (1 = real token); right-padded, or
    left-padded for generation."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        input_ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask
