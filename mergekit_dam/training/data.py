"""Each expert's calibration data: load, render to text, tokenise, split, batch, order.

A model's `dataset` is a local file (.jsonl/.json/.parquet/.csv/.txt) or a Hugging Face
dataset id (with `dataset_config`, `dataset_split`), loaded with `datasets`. Records
are rendered to text in this order of preference:
  1. the `text_field` (default `text`) when it holds a string: every token is scored;
  2. chat `messages` (a list of {role, content}), through the tokenizer's chat template:
     the assistant turns are the answer;
  3. prompt/response pairs (`prompt` + `response`, or `prompt` + `completion`), as
     "{prompt}\\n{response}": the response is the answer;
  4. Alpaca records (`instruction`, optional `input`, `output`): through the chat template
     (instruction and input as the user turn) when the tokenizer has one, else the Stanford
     Alpaca prompt; the output is the answer.
With `loss_on: answer` (the default) the loss is taken on the answer tokens only.
Shuffled with the seed, the first `samples` kept, truncated to `max_length` tokens.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.paths import LOCAL_BUILDERS, dataset_file_problem, is_local, resolve_path
from mergekit_dam.core.settings import ModelSettings
from mergekit_dam.training.answers import check_answers

PAIR_FIELDS = (("prompt", "response"), ("prompt", "completion"))
LOG = logging.getLogger("mergekit_dam")


def load_records(settings: ModelSettings, model: str):
    """The raw `datasets.Dataset` for one model."""
    import datasets

    datasets.disable_progress_bars()  # per-file "Generating split" bars are noise here
    name = settings.dataset
    try:
        if is_local(name):
            path = resolve_path(name)
            builder = LOCAL_BUILDERS.get(os.path.splitext(path)[1].lower())
            problem = dataset_file_problem(name, model)
            if problem:
                raise DamError(problem)
            if builder is None:
                raise DamError(
                    f"dam: dataset {path} (model {model}) has an unsupported extension; "
                    f"use one of {', '.join(sorted(LOCAL_BUILDERS))}"
                )
            if os.path.getsize(path) == 0:
                raise DamError(f"dam: dataset {path} (model {model}) is empty; give it examples or remove it")
            if builder != "parquet":
                _check_utf8(path, model)
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


def _check_utf8(path: str, model: str) -> None:
    """Text formats must be UTF-8; `datasets` would otherwise fail on the first bad record
    only when it is read, deep inside training (and per format in a different place)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        try:
            while chunk := handle.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise DamError(f"dam: dataset {path} (model {model}) is not UTF-8 text ({error.reason}); re-encode it as UTF-8") from None


# The Stanford Alpaca prompt (the reference implementation's data format), for tokenizers without a chat template.
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
FORMATS = ("a `text_field` string, chat `messages`, `prompt` + `response` (or `completion`), "
           "or Alpaca `instruction` (+ `input`) + `output`")


@dataclass(frozen=True)
class Example:
    """One tokenised record: its token ids and, for records with an answer, which tokens
    are the answer (the tokens the loss is taken on); None: every token."""

    ids: List[int]
    answer: Optional[List[int]] = None  # 1 on answer tokens
    cut: bool = False  # its answer ran past max_length (all or part of it is not among the ids)

    def __len__(self) -> int:
        return len(self.ids)


def render(record: Dict[str, Any], settings: ModelSettings, tokenizer, model: str) -> Tuple[str, Optional[List[Tuple[int, int]]]]:
    """(text, character spans of the answer, or None when the record has no answer)."""
    if isinstance(record.get(settings.text_field), str):
        return record[settings.text_field], None
    if isinstance(record.get("messages"), list):
        if not getattr(tokenizer, "chat_template", None):
            raise DamError(
                f"dam: dataset {settings.dataset} (model {model}) has chat `messages` but the tokenizer has no "
                "chat template; set `chat_template:` in the config or give the records a text field"
            )
        return _render_chat(record["messages"], tokenizer)
    for prompt, response in PAIR_FIELDS:
        if isinstance(record.get(prompt), str) and isinstance(record.get(response), str):
            return _answered(f"{record[prompt]}\n", record[response])
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        instruction, context = record["instruction"], record.get("input") or ""
        if getattr(tokenizer, "chat_template", None):
            user = f"{instruction}\n\n{context}" if context else instruction
            return _render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}], tokenizer)
        prompt = ALPACA_PROMPT.format(context=", paired with an input that provides further context" if context else "",
                                      instruction=instruction, input=f"### Input:\n{context}\n\n" if context else "")
        return _answered(prompt, record["output"])
    raise DamError(
        f"dam: dataset {settings.dataset} (model {model}) records have none of the formats DAM reads ({FORMATS}); "
        f"(found: {', '.join(sorted(record))}); set `text_field` to the field holding the text, or rename the fields"
    )


def _answered(prompt: str, answer: str) -> tuple:
    return prompt + answer, [(len(prompt), len(prompt) + len(answer))]


def _render_chat(messages: List[dict], tokenizer) -> tuple:
    """The chat template's text, and for each assistant turn the span from the end of the
    conversation before it (with the generation prompt) to the end of the turn: the
    reply and the template's end-of-turn marker."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if text.startswith(before) and text.startswith(through) and len(through) > len(before):
            spans.append((len(before), len(through)))
        else:  # a template that renders turns differently in context: find the reply itself
            reply = str(message.get("content", ""))
            start = text.find(reply, cursor)
            if start < 0:
                continue
            spans.append((start, start + len(reply)))
        cursor = spans[-1][1]
    return text, spans


def _answer_mask(offsets, spans) -> List[int]:
    """1 for the tokens whose characters overlap an answer span."""
    return [int(any(begin < end_span and end > start for start, end_span in spans) and end > begin) for begin, end in offsets]


def tokenize(
    settings: ModelSettings, tokenizer, model: str, *, samples: int, max_length: int, seed: int, loss_on: str = "answer"
) -> List[Example]:
    """Up to `samples` shuffled examples, each at most `max_length` tokens. With
    `loss_on: answer`, records with an answer (chat, prompt/response, Alpaca) mark their
    answer tokens; plain text is scored on every token."""
    records = load_records(settings, model).shuffle(seed=seed)
    examples = []
    for record in records.select(range(min(samples, len(records)))):
        text, spans = render(record, settings, tokenizer, model)
        scored = spans is not None and loss_on == "answer"
        if scored and not getattr(tokenizer, "is_fast", False):
            raise DamError(f"dam: `loss_on: answer` needs a fast tokenizer (character offsets); {model}'s is not: set `loss_on: all`")
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=scored)
        if encoded["input_ids"]:
            answer = _answer_mask(encoded["offset_mapping"], spans) if scored else None
            cut = scored and bool(spans) and encoded["offset_mapping"][-1][1] < max(end for _, end in spans)
            examples.append(Example(list(encoded["input_ids"]), answer, cut))
    if not examples:
        raise DamError(f"dam: dataset {settings.dataset} (model {model}) has no text after tokenisation")
    return examples


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
    """`sequences` (indices into one expert's set) padded together: ids, attention mask,
    and the mask of the tokens the loss is taken on (the answers; by default every token).
    Packed (packing.py): several sequences per row, `places` their (row, start), and
    `position_ids` restarting at each; the model then gets no attention mask."""

    sequences: List[int]
    ids: torch.Tensor
    mask: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    places: Optional[List[Tuple[int, int]]] = None  # None: sequence k is row k, from position 0

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = self.mask
        if self.places is None:
            self.places = [(row, 0) for row in range(len(self.sequences))]

    @classmethod
    def of(cls, dataset: Sequence[Example], sequences: Sequence[int], pad_id: int) -> "Batch":
        return cls(list(sequences), *collate_examples([dataset[k] for k in sequences], pad_id))

    def inputs(self, device) -> dict:
        """The model's keyword arguments for this batch, on `device`."""
        if self.position_ids is not None:
            return {"input_ids": self.ids.to(device), "attention_mask": None, "position_ids": self.position_ids.to(device)}
        return {"input_ids": self.ids.to(device), "attention_mask": self.mask.to(device)}

    def rows(self, begin: int, end: int, device) -> "Batch":
        """Rows [begin, end) on `device`, with the sequences placed in them."""
        kept = [(sequence, (row - begin, start)) for sequence, (row, start) in zip(self.sequences, self.places) if begin <= row < end]
        positions = None if self.position_ids is None else self.position_ids[begin:end].to(device)
        return Batch([sequence for sequence, _ in kept], *(t[begin:end].to(device) for t in (self.ids, self.mask, self.loss_mask)),
                     position_ids=positions, places=[place for _, place in kept])


def collate_examples(examples: Sequence[Example], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, loss mask) of right-padded examples."""
    ids, mask = collate([example.ids for example in examples], pad_id)
    loss_mask = mask.clone()
    for row, example in enumerate(examples):
        if example.answer is not None:
            loss_mask[row, : len(example)] = torch.tensor(scored_positions(example), dtype=loss_mask.dtype)
    return ids, mask, loss_mask


def scored_positions(example: Example) -> List[int]:
    """1 at each position whose logits the loss is taken on; plain text: every position.
    Position j's logits predict token j + 1, so for a record with an answer these are the
    positions that predict an answer token (the first one from the prompt's last position)
    and the answer's last position, which predicts what follows it: where the answer ends."""
    if example.answer is None:
        return [1] * len(example)
    return [int(here or after) for here, after in zip(example.answer, example.answer[1:] + [0])]


@dataclass
class ExpertData:
    """The experts with data (row indices, in row order), their training, validation and
    held-out token sequences, and the padding id."""

    experts: List[int]
    train: Dict[int, List[Example]]
    held_out: Dict[int, List[Example]]
    pad_id: int
    validation: Dict[int, List[Example]] = None  # None: the held-out split serves
    answered: Dict[str, dict] = None  # per expert row: its examples and those without an answer token (answers.py)

    def chunks(self, split: str, size: int, pack: Optional[Callable] = None) -> Dict[int, List[Batch]]:
        """Each expert's `split` ("train", "validation", "held_out", or "train_sample": its first
        training examples, as many as it holds out) in consecutive batches of `size` sequences,
        padded, or made by pack(examples, their indices) (packing.py)."""
        if split == "train_sample":
            sets = {i: self.train[i][: len(self.held_out[i])] for i in self.experts}
        else:
            sets = {"train": self.train, "held_out": self.held_out, "validation": self.validation or self.held_out}[split]
        make = pack or (lambda examples, sequences: Batch(list(sequences), *collate_examples(examples, self.pad_id)))
        spans = {i: [range(k, min(k + size, len(sets[i]))) for k in range(0, len(sets[i]), size)] for i in self.experts}
        return {i: [make([sets[i][k] for k in span], span) for span in spans[i]] for i in self.experts}

    def steps(self, settings) -> int:
        """`steps`, or `epochs` passes over the largest expert's training set, at least `min_steps`."""
        steps_per_epoch = math.ceil(max(len(s) for s in self.train.values()) / settings.batch_size / settings.grad_accum)
        return settings.steps or max(settings.min_steps, math.ceil(settings.epochs * steps_per_epoch))

    def train_lengths(self) -> List[int]:
        """The length of every training example (what `batch_size: auto` decides by)."""
        return [len(example) for examples in self.train.values() for example in examples]


def prepare_data(job) -> ExpertData:
    """Tokenise every expert's data; of each shuffled set the last 10% (at least 1, at
    most HELD_OUT_MAX) is held out for the report and the 10% before it is the
    validation split that chooses the coefficients to keep (sets under 10 examples: the
    held-out split serves for both)."""
    settings = job.settings
    positions = getattr(job.out_config, "max_position_embeddings", None)
    max_length = settings.max_length
    if positions and max_length > positions:  # longer inputs would be positions the model never saw
        log = LOG.warning if "max_length" in settings.model_fields_set else LOG.info  # the default is for 7B models
        log("dam: max_length %d exceeds the model's max_position_embeddings %d; examples are cut at %d",
                    max_length, positions, positions)
        max_length = positions
    pad_id = job.tokenizer.pad_token_id if job.tokenizer.pad_token_id is not None else (job.tokenizer.eos_token_id or 0)
    experts = [index for index, row in enumerate(job.rows) if row in job.data]
    train, validation, held_out, answered = {}, {}, {}, {}
    for index in experts:
        row = job.rows[index]
        sequences = tokenize(job.data[row], job.tokenizer, row, samples=settings.samples, max_length=max_length,
                             seed=settings.seed, loss_on=settings.loss_on)
        answered[row] = check_answers(row, sequences, max_length)
        keep = max(1, min(HELD_OUT_MAX, len(sequences) // 10)) if len(sequences) >= 2 else 0
        check = keep if len(sequences) >= 10 else 0
        train[index] = sequences[: len(sequences) - keep - check] if keep else sequences
        validation[index] = sequences[len(sequences) - keep - check : len(sequences) - keep] if check else None
        held_out[index] = sequences[len(sequences) - keep :] if keep else sequences
        if not keep:
            LOG.warning("dam: %s has a single example; its held-out KL is measured on training data", row)
    if any(v is None for v in validation.values()):
        validation = None
    return ExpertData(experts, train, held_out, pad_id, validation, answered)


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
