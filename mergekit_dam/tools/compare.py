"""Score models side by side: every skill's held-out data, the experts, general text.

Per model and skill:
- `nll` / `ppl`: mean negative log-likelihood per answer token (prompt/answer records,
  the answer followed by EOS, given the prompt) or per token (text records);
- `accuracy`: exact match of the greedy continuation of each prompt (answer records);
- `kl`: KL(expert || model) per token on the skill's held-out texts, T = 1 (needs the
  skill's expert);
and per model `general_nll` on general text (forgetting). With a base model and the
experts, `retention` = share of each expert's gain over the base that a model keeps.
`compare --lm-eval` adds `lm_eval`: {task: {metric: value}} from lm-evaluation-harness
(harness.py), and `compare --compute NAME=FLOAT` adds `compute`: what making the model cost,
in forward-token equivalents (benchmarks/evolution.py counts them for DAM and for an
evolutionary search; 0 for a merge without any search). Writes JSON, a markdown table and a
PNG chart (with compute: mean exact match and mean KL against compute too).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from mergekit_dam.tools.harness import lm_eval_columns, lm_eval_label
from mergekit_dam.training.data import collate
from mergekit_dam.training.objective import kl_divergence


@dataclass
class Suite:
    skills: Dict[str, str]  # skill -> held-out jsonl ({"prompt","answer"} or {"text"} records)
    experts: Dict[str, str] = field(default_factory=dict)  # skill -> expert model dir
    general: Optional[str] = None  # jsonl of {"text"} records
    base: Optional[str] = None

    @classmethod
    def from_lab(cls, manifest: dict) -> "Suite":
        return cls(
            skills={skill: entry["held_out"] for skill, entry in manifest["skills"].items()},
            experts={skill: entry["expert"] for skill, entry in manifest["skills"].items()},
            general=manifest["general"],
            base=manifest["base"],
        )


def read_records(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Scorer:
    """One causal LM and its tokenizer, scored in float32."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self._hold(model, AutoTokenizer.from_pretrained(path), device)

    @classmethod
    def of(cls, model, tokenizer, device: str = "cpu") -> "Scorer":
        """A scorer of a model already in memory (e.g. one being fine-tuned); it is used as it is."""
        scorer = cls.__new__(cls)
        scorer._hold(model, tokenizer, device)
        return scorer

    def _hold(self, model, tokenizer, device: str) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text)["input_ids"]

    def _batch(self, sequences: List[List[int]], left: bool = False):
        ids, mask = collate(sequences, self.pad, left=left)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding must not shift positions
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    @torch.no_grad()
    def _logits(self, ids, mask, positions) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()

    def logits(self, sequences: List[List[int]]) -> tuple:
        ids, mask, positions = self._batch(sequences)
        return self._logits(ids, mask, positions), mask

    def nll(self, records: List[dict], chunk: int = 8) -> float:
        """Mean NLL per scored token: answer + EOS for answer records, every token but the first for text."""
        return self.teacher_forced(records, chunk)["nll"]

    @torch.no_grad()
    def teacher_forced(self, records: List[dict], chunk: int = 8) -> dict:
        """From one forward per chunk: the mean NLL per scored token ("nll"; answer + EOS for
        answer records, every token but the first for text) and the share of records whose
        every scored token is the greedy choice given the true prefix ("accuracy")."""
        total, count, correct = 0.0, 0, 0
        for begin in range(0, len(records), chunk):
            sequences, starts = [], []
            for record in records[begin : begin + chunk]:
                if "answer" in record:
                    prompt = self.encode(record["prompt"])
                    answer = self.tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
                    sequences.append(prompt + answer + [self.tokenizer.eos_token_id])
                    starts.append(len(prompt))
                else:
                    sequences.append(self.encode(record["text"]))
                    starts.append(1)
            ids, mask, positions = self._batch(sequences)
            logits = self._logits(ids, mask, positions)[:, :-1]
            targets = ids[:, 1:]
            token_log_probs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
            positions = torch.arange(ids.shape[1] - 1, device=ids.device)[None] + 1
            scored = (positions >= torch.tensor(starts, device=ids.device)[:, None]) & (mask[:, 1:] == 1)
            total -= float(token_log_probs[scored].sum())
            count += int(scored.sum())
            correct += int(((logits.argmax(-1) == targets) | ~scored).all(-1).sum())
        return {"nll": total / max(count, 1), "accuracy": correct / max(len(records), 1)}

    @torch.no_grad()
    def greedy(self, prompts: List[str], max_new_tokens: int) -> List[str]:
        sequences = [self.encode(p) for p in prompts]
        generated = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new_tokens):
            batch = self._batch([s + g for s, g in zip(sequences, generated)], left=True)
            next_tokens = self._logits(*batch)[:, -1].argmax(-1).tolist()
            for row, token in enumerate(next_tokens):
                if not done[row]:
                    if token == self.tokenizer.eos_token_id:
                        done[row] = True
                    else:
                        generated[row].append(token)
            if all(done):
                break
        return [self.tokenizer.decode(g, skip_special_tokens=True) for g in generated]

    def answers(self, records: List[dict]) -> List[str]:
        """Greedy answers to `records`' prompts, each up to the longest answer's tokens plus 2
        (room to stop), stripped."""
        longest = max(len(self.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in records)
        return [out.strip() for out in self.greedy([r["prompt"] for r in records], longest + 2)]

    def accuracy(self, records: List[dict]) -> Optional[float]:
        answered = [r for r in records if "answer" in r]
        if not answered:
            return None
        return sum(out == r["answer"].strip() for out, r in zip(self.answers(answered), answered)) / len(answered)


def texts_of(records: List[dict]) -> List[str]:
    return [r["prompt"] + r["answer"] if "answer" in r else r["text"] for r in records]


def kl_to(expert: Scorer, model: Scorer, texts: List[str], chunk: int = 8) -> float:
    """KL(expert || model) per token, T = 1, over the texts' real tokens."""
    total, count = 0.0, 0
    for begin in range(0, len(texts), chunk):
        sequences = [expert.encode(t) for t in texts[begin : begin + chunk]]
        teacher, mask = expert.logits(sequences)
        student, _ = model.logits(sequences)
        tokens = int(mask.sum())
        total += float(kl_divergence(student, teacher, mask, temperature=1.0)) * tokens  # masked mean -> sum
        count += tokens
    return total / max(count, 1)


def score(models: Dict[str, str], suite: Suite, device: str = "cpu") -> dict:
    data = {skill: read_records(path) for skill, path in suite.skills.items()}
    general = read_records(suite.general) if suite.general else None
    experts = {skill: Scorer(path, device) for skill, path in suite.experts.items()}
    results = {}
    skill_of_expert = {path: skill for skill, path in suite.experts.items()}
    for name, path in models.items():
        scorer = experts[skill_of_expert[path]] if path in skill_of_expert else Scorer(path, device)
        entry = {}
        for skill, records in data.items():
            nll = scorer.nll(records)
            entry[skill] = {"nll": nll, "ppl": math.exp(min(nll, 50)), "accuracy": scorer.accuracy(records)}
            if skill in experts:
                entry[skill]["kl"] = kl_to(experts[skill], scorer, texts_of(records))
        if general:
            entry["general_nll"] = scorer.nll(general)
        results[name] = entry
    if suite.base and suite.experts:
        add_retention(results, models, suite)
    return results


def add_retention(results: dict, models: Dict[str, str], suite: Suite) -> None:
    """retention[skill] = (base - model) / (base - expert) in NLL, and in accuracy where defined."""
    by_path = {path: name for name, path in models.items()}
    base, experts = by_path.get(suite.base), {s: by_path.get(p) for s, p in suite.experts.items()}
    if base is None or None in experts.values():
        return
    for name, entry in results.items():
        entry["retention"] = {}
        for skill, expert in experts.items():
            gains = {}
            for metric, sign in (("nll", 1), ("accuracy", -1)):
                b, e, m = results[base][skill][metric], results[expert][skill][metric], entry[skill][metric]
                if b is not None and e is not None and abs(b - e) > 1e-9:
                    gains[metric] = (b - m) / (b - e) if sign == 1 else (m - b) / (e - b)
            entry["retention"][skill] = gains


def has_compute(results: dict) -> bool:
    return any("compute" in entry for entry in results.values())


def markdown(results: dict) -> str:
    first = next(iter(results.values()))
    skills = [k for k, v in first.items() if isinstance(v, dict) and "nll" in v]
    harness = lm_eval_columns(results)
    compute = has_compute(results)
    header = ("| model | " + " | ".join(f"{s} acc | {s} NLL | {s} KL" for s in skills) + " | general NLL |"
              + "".join(f" {lm_eval_label(task, metric)} |" for task, metric in harness) + (" compute |" if compute else ""))
    lines = [header, "|" + "---|" * (2 + 3 * len(skills) + len(harness) + compute)]
    for name, entry in results.items():
        cells = []
        for skill in skills:
            m = entry[skill]
            cells += ["–" if m["accuracy"] is None else f"{m['accuracy']:.2f}", f"{m['nll']:.3f}", f"{m['kl']:.3f}" if "kl" in m else "–"]
        general = entry.get("general_nll")
        cells.append("–" if general is None else f"{general:.3f}")
        cells += [f"{entry['lm_eval'][task][metric]:.3f}" for task, metric in harness]
        if compute:
            cells.append(f"{entry['compute']:.3g}" if "compute" in entry else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(results: dict, path: str, highlight: Optional[List[str]] = None) -> str:
    """The comparison as a PNG (charts.compare_chart: one panel per metric with values, the
    experts and the base as reference marks, one colour per model, and against compute when
    models have one)."""
    from mergekit_dam.tools.charts import compare_chart  # matplotlib only when a chart is drawn

    return compare_chart(results, path, highlight)


def write_outputs(results: dict, out_dir: str, highlight: Optional[List[str]] = None) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "compare.json"), "table": os.path.join(out_dir, "compare.md"),
             "chart": os.path.join(out_dir, "compare.png")}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    with open(paths["table"], "w", encoding="utf-8") as handle:
        handle.write(markdown(results) + "\n")
    chart(results, paths["chart"], highlight)
    return paths
