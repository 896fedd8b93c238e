"""What several benchmark scripts share, in one place (each script imports it as its
neighbour: `python benchmarks/<script>.py` puts this folder first on the path). Everything
else a benchmark uses is the package's own code, through its public names."""

from __future__ import annotations

import json

import yaml

from mergekit_dam import sidecar

# Mistral-style geometries the GPU benchmarks build random experts of
GEOMETRIES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}


def dam_compute(report: dict) -> float:
    """DAM's training compute in forward-token equivalents, from its `<artifact>.report.json`:

        compute = 3 * T  +  sum_i T_i  =  4 * T

    T = report["tokens"], the real tokens through the merged model in training (every expert's
    rows of every micro-batch, the `lr: auto` probe included). The merged model runs forward
    and backward on them: x3 (backward ~ 2 forwards). Expert i's teacher forwards only expert
    i's own rows (end-to-end mode, `teacher: online`: training/modes/end_to_end.py,
    micro_batch_loss), so the teachers' forwards sum to T_1 + ... + T_N = T, x1 each, whatever
    the number N of experts with data (every row has exactly one teacher). N enters only as a
    check: a report without any expert with data trained nothing. With `teacher: topk` the
    teachers forward the training split once before training, so 4T is an upper bound. Not counted (on the lab about 4%, all forward-only): the
    validation KL every `eval_every` steps and after each probe rate, and the held-out KL at
    step 0 and at the end (the evolution's counterpart, its fitness, is counted in full).
    """
    if report.get("tokens") is None:
        raise ValueError("the DAM report has no `tokens` (a report from before they were recorded): "
                         "retrain, or pass --dam-compute")
    experts = len(report.get("held_out_kl", {}).get("final", {}))  # the rows trained against a teacher
    if experts < 1:
        raise ValueError("the DAM report names no expert with data")
    merged = 3 * float(report["tokens"])  # forward + backward
    teachers = float(report["tokens"])  # sum over the experts of their own rows, forward only
    return merged + teachers


def teacher_forced_tokens(tokenizer, pairs) -> int:
    """The forward tokens of one teacher-forced evaluation of (prompt, answer) pairs: prompt +
    answer + end-of-sequence token each (compare.Scorer.teacher_forced's sequences). The
    evolution's fitness and the tuned grids' validation are counted with it."""
    return sum(len(tokenizer(p)["input_ids"]) + len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for p, a in pairs)


def read_report(artifact: str) -> dict:
    """The training report written beside `artifact`."""
    with open(sidecar(artifact, "report"), encoding="utf-8") as handle:
        return json.load(handle)


def variant(text: str) -> tuple:
    """A DAM run given as NAME:key=value[,key=value...] (values read as YAML): (NAME, settings);
    a first item `defaults` (NAME:defaults,key=value...) marks settings over the package's
    defaults rather than the demo's, as {"defaults": True, ...}."""
    name, _, settings = text.partition(":")
    items = [item for item in settings.split(",") if item]
    over_defaults = bool(items) and items[0] == "defaults"
    values = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items[over_defaults:])}
    return name, ({"defaults": True} if over_defaults else {}) | values
