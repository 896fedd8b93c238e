"""The merge lab: a tiny base model and experts fine-tuned from it on clearly different
skills, built offline and deterministically in a few minutes on a CPU.

Mirrors the DAM paper's setup (experts from one base with different specialities):
- a character-level tokenizer and a tiny Llama base, pretrained briefly on generated
  general text (a small English grammar);
- one expert per skill, fully fine-tuned from the base: arithmetic (two-digit addition
  without carries, `31+45=` -> `76`),
  a string transformation (`abc>` -> `BCD`, next letter, upper case), a synthetic foreign language (word-by-word
  translation with an invented dictionary, `the cat|` -> `ka miro`), and code-like
  structure (closing brackets, `([<~` -> `>])`);
- per skill: calibration data for DAM, a validation split for tuning, and a held-out
  split with exact answers. The example space is partitioned by a hash of the prompt,
  so held-out prompts never occur in fine-tuning, calibration or validation data;
- an lm-evaluation-harness task per skill over its held-out file (`lm_eval_tasks/`, tag
  `dam_lab`), so `compare --lm-eval` runs offline on the lab.
Cached in its directory; rebuilt only when the recipe changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import string
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Tuple

import torch
import yaml

from mergekit_dam.atomic import atomic_write_text
from mergekit_dam.tools.tiny import make_config, make_tokenizer, save_model

LOG = logging.getLogger("mergekit_dam")

SKILLS = ("arithmetic", "shift", "translate", "brackets")
SPLITS = ("train", "validation", "held_out")
LM_EVAL_TAG = "dam_lab"  # lm-eval runs all of the lab's tasks under this name

WORDS = ["the", "a", "cat", "dog", "bird", "fish", "man", "woman", "child", "house", "tree", "river", "sees",
         "eats", "likes", "finds", "big", "small", "red", "old", "runs", "sleeps", "near", "under", "and"]


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the lab's tensors; a change rebuilds the lab."""

    seed: int = 0
    hidden: int = 96
    layers: int = 3
    pretrain_steps: int = 300
    finetune_steps: int = 800
    batch: int = 32
    lr: float = 3e-3
    calibration: int = 256
    validation: int = 48
    held_out: int = 48
    version: int = 1  # bump when the generators below change


def _dictionary(seed: int) -> Dict[str, str]:
    """The invented language: one made-up word per English word."""
    generator = torch.Generator().manual_seed(seed + 7)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    result, used = {}, set()
    for word in WORDS:
        while True:
            syllables = 1 + int(torch.randint(0, 2, (1,), generator=generator))
            made = "".join(consonants[int(torch.randint(0, 14, (1,), generator=generator))] + vowels[int(torch.randint(0, 5, (1,), generator=generator))] for _ in range(syllables))
            if made not in used:
                used.add(made)
                result[word] = made
                break
    return result


def _sentence(generator: torch.Generator) -> List[str]:
    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=generator))]

    words = [pick(["the", "a"]), pick(["big", "small", "red", "old", ""]), pick(["cat", "dog", "bird", "man", "woman", "child"])]
    words += [pick(["sees", "eats", "likes", "finds"]), pick(["the", "a"]), pick(["fish", "house", "tree", "river", "dog"])]
    if int(torch.randint(0, 3, (1,), generator=generator)) == 0:
        words += [pick(["near", "under"]), "the", pick(["house", "tree", "river"])]
    return [w for w in words if w]


def skill_generators(seed: int) -> Dict[str, Callable[[torch.Generator], Tuple[str, str]]]:
    """(prompt, answer) samplers per skill; answers are exact."""
    dictionary = _dictionary(seed)

    def pick(generator, n):
        return int(torch.randint(0, n, (1,), generator=generator))

    def arithmetic(g):  # two-digit addition without carries: learnable at this size
        digits = [(x, pick(g, 10 - x)) for x in (pick(g, 10), pick(g, 10))]
        a, b = "".join(str(x) for x, _ in digits), "".join(str(y) for _, y in digits)
        return f"{a}+{b}=", str(int(a) + int(b)).zfill(2)

    def shift(g):
        word = "".join(string.ascii_lowercase[pick(g, 26)] for _ in range(3 + pick(g, 4)))
        return f"{word}>", "".join(string.ascii_uppercase[(string.ascii_lowercase.index(c) + 1) % 26] for c in word)

    def translate(g):
        words = _sentence(g)[: 2 + pick(g, 4)]
        return " ".join(words) + "|", " ".join(dictionary[w] for w in words)

    def brackets(g):
        pairs = ["()", "[]", "{}", "<>"]
        opened = [pairs[pick(g, 4)] for _ in range(2 + pick(g, 4))]
        return "".join(p[0] for p in opened) + "~", "".join(p[1] for p in reversed(opened))

    return {"arithmetic": arithmetic, "shift": shift, "translate": translate, "brackets": brackets}


def split_of(prompt: str) -> str:
    """Hash partition of the prompt space: 80% train (fine-tuning + calibration), 10% each
    validation and held-out; a prompt belongs to exactly one split."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10
    return "held_out" if bucket == 0 else "validation" if bucket == 1 else "train"


def sample(generator_fn, split: str, count: int, generator: torch.Generator, unique: bool = True) -> List[Tuple[str, str]]:
    examples, seen = [], set()
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"lab: could not draw {count} distinct {split} examples")
        prompt, answer = generator_fn(generator)
        if split_of(prompt) != split or (unique and prompt in seen):
            continue
        seen.add(prompt)
        examples.append((prompt, answer))
    return examples


def general_text(generator: torch.Generator, count: int) -> List[str]:
    return [" ".join(_sentence(generator)) + "." for _ in range(count)]


def _lm_steps(model, tokenizer, texts_fn: Callable[[], List[str]], steps: int, lr: float) -> None:
    from mergekit_dam.training.data import collate

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)  # linear decay
    model.train()
    for _ in range(steps):
        ids, mask = collate([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts_fn()], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _write_jsonl(path: str, records: List[dict]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def lm_eval_task(skill: str, held_out: str, tokenizer) -> dict:
    """The lm-eval task of one skill, built to mirror compare's exact match so that the two
    scores agree: the prompt alone as context, greedy generation ended by the end-of-sequence
    token the experts learned or after the longest answer + 2 tokens, whitespace-trimmed
    comparison."""
    with open(held_out, encoding="utf-8") as handle:
        answers = [json.loads(line)["answer"] for line in handle if line.strip()]
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return {
        "task": f"{LM_EVAL_TAG}_{skill}",
        "tag": LM_EVAL_TAG,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": held_out}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "generation_kwargs": {"until": [tokenizer.eos_token], "do_sample": False, "max_gen_toks": longest + 2},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
        "metadata": {"version": 1},
    }


def write_lm_eval_tasks(root: str, skills: Dict[str, dict]) -> str:
    """One task YAML per skill in `root/lm_eval_tasks`, for lm-eval's `include_path`."""
    folder = os.path.join(root, "lm_eval_tasks")
    tokenizer = make_tokenizer()
    for skill, files in skills.items():
        task = lm_eval_task(skill, files["held_out"], tokenizer)
        atomic_write_text(os.path.join(folder, f"{task['task']}.yaml"), yaml.safe_dump(task, sort_keys=False))
    return folder


def write_general_calibration(root: str, recipe: Recipe, held_out_path: str) -> str:
    """General text for `retain_dataset`, none of it in the held-out general text (the
    forgetting metric), from a seed of its own."""
    with open(held_out_path, encoding="utf-8") as handle:
        held_out = {json.loads(line)["text"] for line in handle if line.strip()}
    texts = [t for t in general_text(torch.Generator().manual_seed(recipe.seed + 3), 2 * recipe.calibration) if t not in held_out]
    return _write_jsonl(os.path.join(root, "data", "general.calibration.jsonl"), [{"text": t} for t in texts[: recipe.calibration]])


# fingerprint() of the default recipe's build that BENCHMARKS.md's lab figures come from
# (torch 2.13.0+cpu, x86-64, 2 cores). Built again on that machine it is bit-identical, on 1
# thread or 2; another torch or CPU may round the fine-tuning differently, and then the figures
# are expected only within their seed spread.
REFERENCE_FINGERPRINT = "cd0b1746a436c0eb6039718dd6e80d029a7a51b04a1429b10c2cb322914499da"


def fingerprint(manifest: dict) -> str:
    """sha256 over the base's and experts' tensors (each one's name, dtype, shape and bytes)."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for path in [manifest["base"], *(entry["expert"] for entry in manifest["skills"].values())]:
        tensors = load_file(os.path.join(path, "model.safetensors"))
        for name in sorted(tensors):
            tensor = tensors[name].contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_reference(manifest: dict) -> bool:
    """Say whether a default-recipe lab is the reference build (its figures then apply exactly)."""
    if manifest["recipe"] != asdict(Recipe()):
        return False
    same = manifest["fingerprint"] == REFERENCE_FINGERPRINT
    if same:
        LOG.info("lab: bit-identical to the reference build: BENCHMARKS.md's lab figures apply as they are")
    else:
        LOG.warning("lab: this build differs from the reference build (torch %s on %s rounds the fine-tuning differently); "
                    "lab figures may differ from BENCHMARKS.md's within their spread over seeds", torch.__version__, platform.machine())
    return same


def build(root: str, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Build (or reuse) the lab in `root`; returns its manifest (also `root/lab.json`)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    root = os.path.abspath(root)  # the manifest's paths: a relative one reads as a hub id to mergekit
    manifest_path = os.path.join(root, "lab.json")
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("recipe") == asdict(recipe):
            before = dict(manifest)  # a lab built before these entries gets them, its models kept
            if "lm_eval_tasks" not in manifest:
                manifest["lm_eval_tasks"] = write_lm_eval_tasks(root, manifest["skills"])
            if "general_calibration" not in manifest:
                manifest["general_calibration"] = write_general_calibration(root, recipe, manifest["general"])
            if "fingerprint" not in manifest:
                manifest["fingerprint"] = fingerprint(manifest)
            if manifest != before:
                atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
            check_reference(manifest)
            return manifest

    torch.manual_seed(recipe.seed)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    tokenizer = make_tokenizer()
    config = make_config("llama", hidden=recipe.hidden, layers=recipe.layers)
    generators = skill_generators(recipe.seed)
    text_generator = torch.Generator().manual_seed(recipe.seed + 1)
    bar = tqdm(total=1 + len(SKILLS), desc="building the lab", disable=not progress)

    base = AutoModelForCausalLM.from_config(config)
    _lm_steps(base, tokenizer, lambda: general_text(text_generator, recipe.batch), recipe.pretrain_steps, recipe.lr)
    manifest = {"recipe": asdict(recipe), "base": save_model(base, os.path.join(root, "base"), tokenizer),
                "skills": {}, "general": None}
    bar.update()
    manifest["general"] = _write_jsonl(os.path.join(root, "data", "general.held_out.jsonl"),
                                       [{"text": t} for t in general_text(torch.Generator().manual_seed(recipe.seed + 2), recipe.held_out)])
    manifest["general_calibration"] = write_general_calibration(root, recipe, manifest["general"])
    for index, skill in enumerate(SKILLS):
        draw = generators[skill]
        train_generator = torch.Generator().manual_seed(recipe.seed + 100 + index)

        def batch_texts():
            return ["".join(pair) for pair in sample(draw, "train", recipe.batch, train_generator, unique=False)]

        expert = AutoModelForCausalLM.from_config(config)
        expert.load_state_dict(base.state_dict())
        _lm_steps(expert, tokenizer, batch_texts, recipe.finetune_steps, recipe.lr)
        files = {}
        for split, count in (("train", recipe.calibration), ("validation", recipe.validation), ("held_out", recipe.held_out)):
            examples = sample(draw, split, count, torch.Generator().manual_seed(recipe.seed + 1000 * (index + 1) + SPLITS.index(split)))
            records = [{"text": p + a} for p, a in examples] if split == "train" else [{"prompt": p, "answer": a} for p, a in examples]
            name = "calibration" if split == "train" else split
            files[name] = _write_jsonl(os.path.join(root, "data", f"{skill}.{name}.jsonl"), records)
        manifest["skills"][skill] = {"expert": save_model(expert, os.path.join(root, f"expert_{skill}"), tokenizer), **files}
        bar.update()
    bar.close()
    manifest["lm_eval_tasks"] = write_lm_eval_tasks(root, manifest["skills"])
    manifest["fingerprint"] = fingerprint(manifest)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    check_reference(manifest)
    return manifest
