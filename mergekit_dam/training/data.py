"""Each expert's calibration data: load, render to text, tokenise, split, batch, order.

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

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch

from mergekit_dam.plugin.config import DamError, ModelSettings, resolve_path

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
PAIR_FIELDS = (("prompt", "response"), ("prompt", "completion"))
LOG = logging.getLogger("mergekit_dam")


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


# --- what training reads: each expert's split, batches, and their order ---------------

HELD_OUT_MAX = 32  # sequences per expert kept aside for the report's held-out KL


@dataclass
class Batch:
    """`sequences` (indices into one expert's set) padded together: ids and mask on CPU."""

    sequences: List[int]
    ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, dataset: Sequence[Sequence[int]], sequences: Sequence[int], pad_id: int) -> "Batch":
        ids, mask = collate([dataset[k] for k in sequences], pad_id)
        return cls(list(sequences), ids, mask)

    def rows(self, begin: int, end: int, device) -> "Batch":
        """Rows [begin, end) on `device`."""
        return Batch(self.sequences[begin:end], self.ids[begin:end].to(device), self.mask[begin:end].to(device))


@dataclass
class ExpertData:
    """The experts with data (row indices, in row order), their training and held-out
    token sequences, and the padding id."""

    experts: List[int]
    train: Dict[int, List[List[int]]]
    held_out: Dict[int, List[List[int]]]
    pad_id: int

    def chunks(self, split: str, size: int) -> Dict[int, List[Batch]]:
        """Each expert's `split` ("train" or "held_out") in consecutive batches of `size`."""
        sets = self.train if split == "train" else self.held_out
        return {i: [Batch.of(sets[i], range(k, min(k + size, len(sets[i]))), self.pad_id) for k in range(0, len(sets[i]), size)]
                for i in self.experts}

    def steps(self, settings) -> int:
        """`steps`, or `epochs` passes over the largest expert's training set."""
        steps_per_epoch = math.ceil(max(len(s) for s in self.train.values()) / settings.batch_size / settings.grad_accum)
        return settings.steps or max(1, math.ceil(settings.epochs * steps_per_epoch))


def prepare_data(job) -> ExpertData:
    """Tokenise every expert's data; the last 10% of each shuffled set (at least 1, at
    most HELD_OUT_MAX) is held out for the report."""
    settings = job.settings
    pad_id = job.tokenizer.pad_token_id if job.tokenizer.pad_token_id is not None else (job.tokenizer.eos_token_id or 0)
    experts = [index for index, row in enumerate(job.rows) if row in job.data]
    train, held_out = {}, {}
    for index in experts:
        row = job.rows[index]
        sequences = tokenize(job.data[row], job.tokenizer, row, samples=settings.samples, max_length=settings.max_length, seed=settings.seed)
        keep = max(1, min(HELD_OUT_MAX, len(sequences) // 10)) if len(sequences) >= 2 else 0
        train[index] = sequences[: len(sequences) - keep] if keep else sequences
        held_out[index] = sequences[len(sequences) - keep :] if keep else sequences
        if not keep:
            LOG.warning("dam: %s has a single example; its held-out KL is measured on training data", row)
    return ExpertData(experts, train, held_out, pad_id)


def batch_indices(count: int, batch_size: int, micro_step: int, seed: int, salt: int) -> List[int]:
    """The sequences of one expert in micro-batch `micro_step`: consecutive slices of
    per-epoch permutations, each permutation a pure function of (seed, salt, epoch), so
    a resumed run sees the data an uninterrupted one would."""
    indices = []
    for position in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + salt * 7919 + epoch)
        indices.append(int(torch.randperm(count, generator=generator)[offset]))
    return indices
