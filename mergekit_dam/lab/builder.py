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
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import yaml

from mergekit_dam.core.atomic import atomic_write_text
from mergekit_dam.lab.skills import SKILLS, SPLITS, general_text, sample, skill_generators
from mergekit_dam.lab.tiny import make_config, make_tokenizer, save_model
from mergekit_dam.training.data import collate

LOG = logging.getLogger("mergekit_dam")

LM_EVAL_TAG = "dam_lab"  # lm-eval runs all of the lab's tasks under this name


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the lab's tensors; a change rebuilds the lab."""

    seed: int = 0
    hidden: int = 96
    layers: int = 3
    pretrain_steps: int = 300
    # each expert is trained to its validation plateau, not for a fixed count: a fixed count ends
    # wherever the run happens to be, and a CPU's rounding moved that from 0.25 to 1.00 exact match
    # (arithmetic, 800 steps, two x86 machines); at the plateau three roundings of the build agree
    # within 0.02 held-out on three skills, and brackets 0.92-1.00 (BENCHMARKS.md, the merge lab)
    finetune_steps: int = 2400  # the most steps per expert (the rate decays linearly over them)
    finetune_check: int = 100  # steps between an expert's validation checks (0: none, all steps run)
    finetune_patience: int = 4  # checks without a better validation score (exact match, then answer NLL) that end an expert's training
    finetune_clip: float = 1.0  # gradient-norm clip of the experts' fine-tuning (0: none)
    batch: int = 32
    lr: float = 3e-3
    calibration: int = 256
    validation: int = 48
    held_out: int = 48
    version: int = 2  # bump when the generators (skills.py) or the training change


def fine_tune(model, batch: Callable[[], tuple], steps: int, lr: float, *, clip: float = 0.0,
              check: Optional[Callable[[int, float], bool]] = None, every: int = 0) -> int:
    """Full fine-tuning of a causal LM's trainable parameters on next-token loss: `steps`
    AdamW steps, each on batch() -> (input ids, attention mask, labels with -100 where no
    loss), the rate decayed linearly to 0, the gradient norm clipped to `clip` (0: not).
    Every `every` steps and at the end, check(step, loss), in eval mode, may stop it (True).
    Returns the steps run; the model is left in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step = 0
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1.0 - (step - 1) / steps)
        model.train()
        ids, mask, labels = batch()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if check is not None and (step % every == 0 or step == steps):
            model.eval()
            if check(step, loss.item()):
                break
    model.eval()
    return step


def text_batches(tokenizer, texts: Callable[[], List[str]]) -> Callable[[], tuple]:
    """batch() for `fine_tune` over plain texts (each ended by EOS): every token scored."""

    def batch() -> tuple:
        ids, mask = collate([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts()], tokenizer.pad_token_id)
        return ids, mask, ids.masked_fill(mask == 0, -100)

    return batch


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
# (recipe version 2; torch 2.13.0+cpu, x86-64 with AVX-512, 2 threads). Built again there it is
# bit-identical; another torch or CPU (or ATEN_CPU_CAPABILITY) may round the fine-tuning
# differently, and then the figures are expected within their spread over builds and seeds.
REFERENCE_FINGERPRINT = "696506657a7c7021b80e27736be60b695bced8667af936e77f209eebc6e31631"


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
                    "lab figures may differ from BENCHMARKS.md's within their spread over builds and seeds", torch.__version__, platform.machine())
    return same


def _reuse(root: str, recipe: Recipe):
    """The manifest of a lab already built in `root` for `recipe` (what labs built before
    later entries lack added, their models kept), or None."""
    manifest_path = os.path.join(root, "lab.json")
    if not os.path.exists(manifest_path):
        return None
    with open(manifest_path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("recipe") != asdict(recipe):
        return None
    before = dict(manifest)
    if "lm_eval_tasks" not in manifest:
        manifest["lm_eval_tasks"] = write_lm_eval_tasks(root, manifest["skills"])
    if "general_calibration" not in manifest:
        manifest["general_calibration"] = write_general_calibration(root, recipe, manifest["general"])
    if "fingerprint" not in manifest:
        manifest["fingerprint"] = fingerprint(manifest)
    if manifest != before:
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest


class Plateau:
    """fine_tune's check for an expert: its validation exact match and answer NLL every few steps,
    the best weights kept (a copy), the training ended after `patience` checks without a better one;
    `curve` is what each check saw. Better: a higher exact match, or the same with a lower NLL. The
    NLL breaks ties because 48 prompts give a coarse score: stopping at the first perfect one left
    experts at 0.92 held-out on one build and 1.00 on another."""

    def __init__(self, model, tokenizer, validation: List[dict], patience: int):
        from mergekit_dam.tools.compare import Scorer

        self.model, self.patience, self.validation = model, patience, validation
        self.scorer = Scorer.of(model, tokenizer)
        self.best, self.best_nll, self.best_step, self.best_state, self.curve = -1.0, float("inf"), 0, None, []

    def __call__(self, step: int, loss: float) -> bool:
        accuracy, nll = self.scorer.accuracy(self.validation), self.scorer.nll(self.validation)
        self.curve.append({"step": step, "loss": round(loss, 5), "validation_accuracy": accuracy, "validation_nll": nll})
        if (accuracy, -nll) > (self.best, -self.best_nll):
            self.best, self.best_nll, self.best_step = accuracy, nll, step
            self.best_state = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        checks_since_best = sum(1 for point in self.curve if point["step"] > self.best_step)
        return checks_since_best >= self.patience

    def restore(self) -> dict:
        """Put the best weights back; what the training log records."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return {"steps": self.curve[-1]["step"] if self.curve else 0, "best_step": self.best_step,
                "validation_accuracy": self.best, "validation_nll": self.best_nll, "curve": self.curve}


def _expert(root: str, recipe: Recipe, index: int, skill: str, draw, base, config, tokenizer) -> tuple:
    """Write skill `index`'s data splits and fine-tune its expert from the base to its validation
    plateau: its manifest entry (the paths) and its training log."""
    from transformers import AutoModelForCausalLM

    files, records = {}, {}
    for split, count in (("train", recipe.calibration), ("validation", recipe.validation), ("held_out", recipe.held_out)):
        examples = sample(draw, split, count, torch.Generator().manual_seed(recipe.seed + 1000 * (index + 1) + SPLITS.index(split)))
        name = "calibration" if split == "train" else split
        records[name] = [{"text": p + a} for p, a in examples] if split == "train" else [{"prompt": p, "answer": a} for p, a in examples]
        files[name] = _write_jsonl(os.path.join(root, "data", f"{skill}.{name}.jsonl"), records[name])

    train_generator = torch.Generator().manual_seed(recipe.seed + 100 + index)
    expert = AutoModelForCausalLM.from_config(config)
    expert.load_state_dict(base.state_dict())
    def texts() -> List[str]:
        return ["".join(pair) for pair in sample(draw, "train", recipe.batch, train_generator, unique=False)]

    plateau = Plateau(expert, tokenizer, records["validation"], recipe.finetune_patience) if recipe.finetune_check else None
    fine_tune(expert, text_batches(tokenizer, texts), recipe.finetune_steps, recipe.lr, clip=recipe.finetune_clip,
              check=plateau, every=recipe.finetune_check)
    training = plateau.restore() if plateau else {"steps": recipe.finetune_steps}
    LOG.info("lab: %s expert: %d steps, validation exact match %.2f (step %d)", skill, training["steps"],
             training.get("validation_accuracy", float("nan")), training.get("best_step", training["steps"]))
    return {"expert": save_model(expert, os.path.join(root, f"expert_{skill}"), tokenizer), **files}, training


def build(root: str, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Build (or reuse) the lab in `root`; returns its manifest (also `root/lab.json`)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    root = os.path.abspath(root)  # the manifest's paths: a relative one reads as a hub id to mergekit
    manifest = _reuse(root, recipe)
    if manifest is not None:
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
    fine_tune(base, text_batches(tokenizer, lambda: general_text(text_generator, recipe.batch)), recipe.pretrain_steps, recipe.lr)
    manifest = {"recipe": asdict(recipe), "base": save_model(base, os.path.join(root, "base"), tokenizer),
                "skills": {}, "general": None, "training": {}}
    bar.update()
    manifest["general"] = _write_jsonl(os.path.join(root, "data", "general.held_out.jsonl"),
                                       [{"text": t} for t in general_text(torch.Generator().manual_seed(recipe.seed + 2), recipe.held_out)])
    manifest["general_calibration"] = write_general_calibration(root, recipe, manifest["general"])
    for index, skill in enumerate(SKILLS):
        manifest["skills"][skill], manifest["training"][skill] = _expert(root, recipe, index, skill, generators[skill], base, config, tokenizer)
        bar.update()
    bar.close()
    manifest["lm_eval_tasks"] = write_lm_eval_tasks(root, manifest["skills"])
    manifest["fingerprint"] = fingerprint(manifest)
    atomic_write_text(os.path.join(root, "lab.json"), json.dumps(manifest, indent=1))
    check_reference(manifest)
    return manifest
