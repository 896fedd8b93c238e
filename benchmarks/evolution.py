"""The evolutionary baseline of issue 15, compute-matched to DAM: CMA-ES (the `cma` package, as
`mergekit-evolve` calls it) over mergekit's own genome (`mergekit.evo.genome.ModelGenome`),
in-process on the CPU, on the merge lab.

    python benchmarks/evolution.py --lab dam-lab --dam-report dam-lab/dam_coefficients.safetensors.report.json \\
        --dam-model merged-dam --simple-merge linear=merged-linear --simple-merge ties=merged-ties \\
        --budget-multiples 1,3,10 --out /tmp/evolution --seed 0
    python benchmarks/evolution.py --lab dam-lab --dam-compute 2e6 --max-evaluations 6 --popsize 3 --out /tmp/evo-smoke

Why not `mergekit-evolve` itself: it cannot run on a CPU-only machine (benchmarks/evolve_findings.md
has the file:line reasons). This script runs the same search by the same pieces, without Ray:
- the genome: `ModelGenomeDefinition(models = the lab's 4 experts, base_model = the base (not
  for linear, below), merge_method, layer_granularity = 1)` (one weight per expert per layer, plus a density for
  ties), one CMA-ES run per merge method (`--methods`, default task_arithmetic, ties and linear);
- the search: `cma.fmin2(None, x0=genome.initial_genotype(), sigma0=1/6, parallel_objective=...,
  options={maxfevals, popsize, seed})`, mergekit-evolve's call and defaults (popsize: cma's own
  default unless `--popsize`);
- each candidate: `genome.genotype_merge_config(x)` merged to disk by mergekit's run_merge into
  a temporary folder, loaded, scored and deleted: mergekit-evolve's default evaluation
  (`--no-in-memory`: mergekit/evo/actors.py OnDiskMergeEvaluator, mergekit/evo/helpers.py
  merge_model and evaluate_model). Its `--in-memory` path (MergePlanner.plan_in_memory) fails
  in mergekit 0.1.5 (evolve_findings.md); on the lab the disk round trip costs about 0.1 s.
  Two deviations, both on purpose: the merge is float32, not mergekit-evolve's hard-coded
  bfloat16, because every other model of the comparison (DAM, the simple merges) is float32;
  and the merge options carry no random_seed (run_merge would re-seed numpy's global
  generator on every merge, which in one process is CMA-ES's generator; none of these three
  methods is random). `linear` gets no base_model: mergekit's genome would add the base as an
  input without a weight, which linear refuses ("Missing required parameter weight");
- the fitness: every skill's CALIBRATION file (the data DAM trains on; never the held-out split),
  split into prompt and answer at the skill's separator, scored with one teacher-forced forward
  per example (prompt + answer + end-of-sequence): exact match (every answer token and the
  end-of-sequence are the greedy choice: lm-eval's `acc` of a loglikelihood task, and compare's
  greedy exact match) and the answer's NLL per token (compare's `nll`). `--fitness both`
  (default) maximises mean exact match - mean NLL over the skills, as a mergekit-evolve config
  with two tasks weighted +1 and -1 would; `accuracy` or `nll` alone are the other choices.
  lm-eval itself was measured and is not used per candidate (evolve_findings.md: it costs
  seconds per candidate where this costs a fraction of one).

Compute is counted in forward-token equivalents, the same way for both:
- evolution: each fitness evaluation forwards its calibration tokens once (x1); a run's compute
  is the number of evaluations times that (merging is weight arithmetic, no tokens: it shows in
  the wall time);
- DAM: helpers.dam_compute(report) (forward + backward of the merged model, x3, plus the
  teachers' forwards, x1).
Budgets are multiples of DAM's compute (`--budget-multiples`). At each one the best genotype
found within it is merged to disk by mergekit's run_merge (`OUT/<method>/<k>x/`, with its config
`OUT/<method>/<k>x.yaml`), ready for held-out scoring with `mergekit-dam compare`; the curve
(per generation: evaluations, compute, wall seconds, best fitness) goes to
`OUT/<method>/curve.json` and everything to `OUT/evolution.json`. Wall seconds count the
search (setup, merges, scoring), not the snapshot writes (recorded apart). DAM's merged model
and the simple merges (`--dam-model`, `--simple-merge`) are scored with the same fitness, and
the `mergekit-dam compare --compute ...` command for the held-out table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from helpers import dam_compute, teacher_forced_tokens

from mergekit_dam.tools.compare import Scorer

METHODS = ("task_arithmetic", "ties", "linear")
FITNESS = ("both", "accuracy", "nll")
SIGMA0 = 1 / 6  # mergekit-evolve's default


# --- fitness: the calibration data ------------------------------------------------------


def separator_of(manifest: dict, skill: str) -> str:
    """The character that ends every prompt of the skill, read from its validation split."""
    with open(manifest["skills"][skill]["validation"], encoding="utf-8") as handle:
        endings = {json.loads(line)["prompt"][-1] for line in handle if line.strip()}
    if len(endings) != 1:
        raise ValueError(f"{skill}: prompts end in {sorted(endings)}, not in one separator")
    return endings.pop()


def calibration_examples(manifest: dict, limit: Optional[int] = None) -> Dict[str, List[Tuple[str, str]]]:
    """{skill: [(prompt, answer)]} from each skill's calibration file ({"text"} records, prompt
    and answer joined), split after the first separator; the first `limit` per skill."""
    result = {}
    for skill, files in manifest["skills"].items():
        separator = separator_of(manifest, skill)
        pairs = []
        with open(files["calibration"], encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    text = json.loads(line)["text"]
                    cut = text.index(separator) + 1
                    pairs.append((text[:cut], text[cut:]))
        result[skill] = pairs[:limit] if limit else pairs
    return result


class CalibrationFitness:
    """Exact match and answer NLL per skill from one teacher-forced forward per example
    (compare.Scorer.teacher_forced, on the model in memory)."""

    def __init__(self, tokenizer, examples: Dict[str, List[Tuple[str, str]]], fitness: str = "both", chunk: int = 256):
        if fitness not in FITNESS:
            raise ValueError(f"fitness must be one of {FITNESS}")
        self.fitness, self.chunk = fitness, chunk
        self.tokenizer = tokenizer
        self.records = {skill: [{"prompt": p, "answer": a} for p, a in pairs] for skill, pairs in examples.items()}
        # forward tokens per evaluation: prompt + answer + end-of-sequence token
        self.tokens = sum(teacher_forced_tokens(tokenizer, pairs) for pairs in examples.values())

    def skill_scores(self, model, records: List[dict]) -> Dict[str, float]:
        return Scorer.of(model, self.tokenizer, next(model.parameters()).device).teacher_forced(records, self.chunk)

    def __call__(self, model) -> dict:
        """{"fitness": higher is better, "skills": {skill: {accuracy, nll}}, "tokens"}."""
        skills = {skill: self.skill_scores(model, records) for skill, records in self.records.items()}
        accuracy = sum(s["accuracy"] for s in skills.values()) / len(skills)
        nll = sum(s["nll"] for s in skills.values()) / len(skills)
        fitness = {"both": accuracy - nll, "accuracy": accuracy, "nll": -nll}[self.fitness]
        return {"fitness": fitness, "accuracy": accuracy, "nll": nll, "skills": skills, "tokens": self.tokens}


# --- the genome and the merges ----------------------------------------------------------


def make_genome(manifest: dict, method: str, layer_granularity: int = 1):
    """mergekit's own genome over the lab: the experts, the base, one method, per-layer genes."""
    from mergekit.evo.config import ModelGenomeDefinition
    from mergekit.evo.genome import ModelGenome

    definition = ModelGenomeDefinition.model_validate({
        "models": [entry["expert"] for entry in manifest["skills"].values()],
        # linear has no base: the genome would add it as an input without a weight (docstring)
        "base_model": None if method == "linear" else manifest["base"],
        "merge_method": method,
        "layer_granularity": layer_granularity,
    })
    return ModelGenome(definition)


def merge_config(genome, genotype, dtype: str = "float32"):
    """`genome.genotype_merge_config(genotype)` as mergekit-evolve builds it, with `dtype` in
    place of its hard-coded bfloat16, round-tripped through its YAML (what a user would save
    and run with mergekit-yaml)."""
    from mergekit.config import MergeConfiguration

    written = yaml.safe_load(genome.genotype_merge_config(genotype).to_yaml())
    return MergeConfiguration.model_validate({**written, "dtype": dtype})


def merge_options():
    from mergekit.options import MergeOptions

    # no random_seed: run_merge would re-seed numpy's global generator, CMA-ES's (module docstring)
    return MergeOptions(cuda=False, device="cpu", copy_tokenizer=True, safe_serialization=True, quiet=True,
                        out_shard_size=1_000_000_000_000, write_model_card=False)


def merge_to_disk(genome, genotype, storage: str, dtype: str = "float32") -> str:
    """mergekit-evolve's merge step (mergekit/evo/helpers.py, merge_model): the genotype's
    config merged by run_merge into a new temporary folder under `storage`."""
    from mergekit.merge import run_merge

    os.makedirs(storage, exist_ok=True)
    path = tempfile.mkdtemp(prefix="merged", dir=storage)
    run_merge(merge_config(genome, genotype, dtype), path, merge_options())
    return path


def load_model(path: str, dtype: str = "float32"):
    """The merged model as lm-eval's `hf` backend would load it (in `dtype`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def write_merge(genome, genotype, out: str, dtype: str = "float32") -> str:
    """The genotype's merge on disk through mergekit's run_merge, and its config beside it."""
    from mergekit.merge import run_merge

    config = merge_config(genome, genotype, dtype)
    with open(out + ".yaml", "w", encoding="utf-8") as handle:
        handle.write(config.to_yaml())
    run_merge(config, out, merge_options())
    return out


# --- the search -------------------------------------------------------------------------


@dataclass
class Search:
    """One CMA-ES run's bookkeeping: compute and wall time per evaluation, the best so far,
    the curve per generation, and the snapshots at each budget."""

    per_evaluation: int  # forward tokens of one fitness evaluation
    budgets: List[Tuple[float, float]]  # (multiple, compute), ascending
    max_evaluations: int
    started: float
    evaluations: int = 0
    compute: float = 0.0
    merge_seconds: float = 0.0
    score_seconds: float = 0.0
    best: Optional[dict] = None  # {"fitness", "genotype", "scores", "evaluation"}

    def wall(self) -> float:
        return time.perf_counter() - self.started

    def can_evaluate(self) -> bool:
        return self.evaluations < self.max_evaluations and bool(self.budgets) and self.compute + self.per_evaluation <= self.budgets[-1][1]


def evolve(manifest: dict, method: str, budgets: Sequence[Tuple[float, float]], out: str, *, seed: int = 0,
           popsize: Optional[int] = None, sigma0: float = SIGMA0, max_evaluations: Optional[int] = None,
           fitness: str = "both", limit: Optional[int] = None, dtype: str = "float32",
           log: Callable[[str], None] = print) -> dict:
    """One CMA-ES run of `method` up to the largest budget (compute, forward-token
    equivalents), or `max_evaluations`. Returns the run's record (also OUT/curve.json)."""
    import cma
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # a loading bar per candidate otherwise
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    genome = make_genome(manifest, method)
    storage = os.path.join(out, "merging")  # mergekit-evolve's --storage-path/merged
    score = CalibrationFitness(AutoTokenizer.from_pretrained(manifest["base"]), calibration_examples(manifest, limit), fitness)
    budgets = sorted(budgets, key=lambda b: b[1])
    affordable = int(budgets[-1][1] // score.tokens)
    state = Search(score.tokens, list(budgets), min(affordable, max_evaluations or affordable), started)
    curve, snapshots = [], []
    x0 = genome.initial_genotype(random=False).view(-1).numpy()
    log(f"{method}: {x0.size} genes, {score.tokens} forward tokens per evaluation, "
        f"{state.max_evaluations} evaluations at most ({affordable} fit the largest budget)")

    def snapshot(multiple: float, budget: float, reached: bool) -> None:
        best = state.best
        entry = {"multiple": multiple, "compute_budget": budget, "reached": reached, "compute": state.compute,
                 "evaluations": state.evaluations, "wall_seconds": state.wall(),
                 "merge_seconds": state.merge_seconds, "score_seconds": state.score_seconds}
        if best is not None:
            clock = time.perf_counter()
            path = write_merge(genome, np.asarray(best["genotype"]), os.path.join(out, f"{multiple:g}x"), dtype)
            entry.update(fitness=best["fitness"], scores=best["scores"], found_at_evaluation=best["evaluation"],
                         genotype=best["genotype"], model=path, config=path + ".yaml",
                         snapshot_seconds=time.perf_counter() - clock)
        snapshots.append(entry)
        log(f"{method} at {multiple:g}x DAM ({state.compute:.3g} of {budget:.3g} tokens, {state.evaluations} evaluations, "
            f"{state.wall():.0f} s): best fitness {entry.get('fitness', float('nan')):.4f}")
        if state.best is not None:
            state.started += entry["snapshot_seconds"]  # the wall clock counts the search, not the writes

    def parallel_objective(genotypes: List[np.ndarray]) -> List[float]:
        costs, scores = [], []
        for x in genotypes:
            while state.budgets and state.compute + state.per_evaluation > state.budgets[0][1]:
                snapshot(*state.budgets.pop(0), reached=True)
            if not state.can_evaluate():
                costs.append(math.inf)  # beyond the budget: not evaluated, not counted (the run ends here)
                continue
            clock = time.perf_counter()
            path = merge_to_disk(genome, x, storage, dtype)
            merged = time.perf_counter()
            result = score(load_model(path, dtype))
            shutil.rmtree(path)
            state.merge_seconds += merged - clock
            state.score_seconds += time.perf_counter() - merged
            state.evaluations += 1
            state.compute += result["tokens"]
            if state.best is None or result["fitness"] > state.best["fitness"]:
                state.best = {"fitness": result["fitness"], "genotype": [float(v) for v in x], "evaluation": state.evaluations,
                              "scores": {k: result[k] for k in ("accuracy", "nll", "skills")}}
            costs.append(-result["fitness"])  # cma minimises
            scores.append(result["fitness"])
        if scores:
            curve.append({"generation": len(curve) + 1, "evaluations": state.evaluations, "compute": state.compute,
                          "wall_seconds": state.wall(), "best_fitness": state.best["fitness"],
                          "generation_best": max(scores), "generation_mean": sum(scores) / len(scores)})
            log(f"{method} generation {len(curve)}: {state.evaluations} evaluations, {state.compute:.3g} tokens, "
                f"{state.wall():.0f} s, best {state.best['fitness']:.4f} (generation best {max(scores):.4f})")
        return costs

    options = {"maxfevals": max(1, state.max_evaluations), "seed": seed + 1, "verbose": -9}  # cma reads seed 0 as "time"
    if popsize:
        options["popsize"] = popsize
    stop = {}
    if state.max_evaluations > 0:
        _, es = cma.fmin2(None, x0, sigma0, options=options, parallel_objective=parallel_objective)
        stop = {key: (value if isinstance(value, (int, float, str)) else str(value)) for key, value in es.stop().items()}
    for multiple, budget in state.budgets:  # budgets the run ended before (max evaluations, or CMA-ES stopped)
        snapshot(multiple, budget, reached=state.compute + state.per_evaluation > budget)
    shutil.rmtree(storage, ignore_errors=True)
    record = {"method": method, "genes": int(x0.size), "popsize": popsize, "sigma0": sigma0, "seed": seed, "fitness": fitness,
              "limit": limit, "dtype": dtype, "tokens_per_evaluation": score.tokens, "evaluations": state.evaluations,
              "compute": state.compute, "wall_seconds": state.wall(), "merge_seconds": state.merge_seconds,
              "score_seconds": state.score_seconds, "cma_stop": stop, "curve": curve, "budgets": snapshots}
    with open(os.path.join(out, "curve.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    return record


# --- the command ------------------------------------------------------------------------


def compare_command(manifest: dict, out: str, records: Dict[str, dict], dam_model: Optional[str], dam: float,
                    simple: Dict[str, str]) -> str:
    """The held-out comparison to run next: the base and the experts (for retention), DAM, the
    simple merges (compute 0: no search) and every snapshot, each with its compute."""
    models = {"base": manifest["base"], **{f"expert:{skill}": entry["expert"] for skill, entry in manifest["skills"].items()}}
    compute = {}
    if dam_model:
        models["dam"], compute["dam"] = dam_model, dam
    for name, path in simple.items():
        models[name], compute[name] = path, 0.0
    for method, record in records.items():
        for entry in record["budgets"]:
            if "model" in entry:
                name = f"evo_{method}_{entry['multiple']:g}x"
                models[name], compute[name] = entry["model"], entry["compute"]
    lab = os.path.dirname(manifest["base"])
    return " ".join(["mergekit-dam compare --lab", lab, *[f"{n}={p}" for n, p in models.items()],
                     *[f"--compute {n}={c:.6g}" for n, c in compute.items()], "--out", os.path.join(out, "compare")])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", default="dam-lab", help="the lab's directory (built if it has no lab.json)")
    parser.add_argument("--dam-report", help="DAM's <artifact>.report.json: its compute is the unit of the budgets")
    parser.add_argument("--dam-compute", type=float, help="DAM's compute in forward-token equivalents, instead of --dam-report")
    parser.add_argument("--held-out", action=argparse.BooleanOptionalAction, default=True,
                        help="at the end, score every merge on the held-out split with the printed `mergekit-dam compare` "
                             "command (table, JSON and chart under OUT/compare)")
    parser.add_argument("--dam-model", help="DAM's merged model, for the compare command printed at the end")
    parser.add_argument("--simple-merge", action="append", default=[], metavar="NAME=PATH",
                        help="a simple merge (no search, compute 0) for the compare command printed at the end")
    parser.add_argument("--budget-multiples", default="1,3,10", help="budgets, in multiples of DAM's compute (default 1,3,10)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"merge methods, one CMA-ES run each (default {','.join(METHODS)})")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--popsize", type=int, help="CMA-ES population (default: cma's, 4 + 3 ln(genes))")
    parser.add_argument("--sigma0", type=float, default=SIGMA0)
    parser.add_argument("--max-evaluations", type=int, help="stop each run after this many evaluations (smoke runs)")
    parser.add_argument("--fitness", choices=FITNESS, default="both")
    parser.add_argument("--limit", type=int, help="calibration examples per skill (default: all)")
    parser.add_argument("--dtype", default="float32")
    return parser.parse_args(argv)


def read_lab(lab: str) -> dict:
    """The lab's manifest as it is on disk (as compare --lab reads it), built only if missing."""
    from mergekit_dam.lab import build

    path = os.path.join(lab, "lab.json")
    if not os.path.exists(path):
        return build(lab)
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def main(argv=None) -> int:
    args = parse_args(argv)
    if (args.dam_report is None) == (args.dam_compute is None):
        sys.exit("evolution.py: give exactly one of --dam-report and --dam-compute")
    if any("=" not in value for value in args.simple_merge):
        sys.exit("evolution.py: --simple-merge takes NAME=PATH")
    simple = dict(value.split("=", 1) for value in args.simple_merge)
    missing = [path for path in [*simple.values(), *([args.dam_model] if args.dam_model else [])] if not os.path.isdir(path)]
    if missing:
        sys.exit(f"evolution.py: no model at {', '.join(missing)}")
    if args.dam_report:
        with open(args.dam_report, encoding="utf-8") as handle:
            report = json.load(handle)
        try:
            dam = dam_compute(report)
        except ValueError as error:
            sys.exit(f"evolution.py: {args.dam_report}: {error}")
        dam_seconds = report.get("seconds")
    else:
        dam, dam_seconds = args.dam_compute, None
    multiples = sorted(float(m) for m in args.budget_multiples.split(","))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"evolution.py: unknown method {unknown}; choose from {METHODS}")
    torch.manual_seed(args.seed)
    manifest = read_lab(args.lab)
    os.makedirs(args.out, exist_ok=True)
    records = {}
    for method in methods:
        records[method] = evolve(manifest, method, [(m, m * dam) for m in multiples], os.path.join(args.out, method),
                                 seed=args.seed, popsize=args.popsize, sigma0=args.sigma0, max_evaluations=args.max_evaluations,
                                 fitness=args.fitness, limit=args.limit, dtype=args.dtype)
    # the same fitness for the models that did not search: DAM and the simple merges
    reference = {**({"dam": args.dam_model} if args.dam_model else {}), **simple}
    fitness = {}
    if reference:
        from transformers import AutoTokenizer

        score = CalibrationFitness(AutoTokenizer.from_pretrained(manifest["base"]), calibration_examples(manifest, args.limit), args.fitness)
        fitness = {name: {k: v for k, v in score(load_model(path, args.dtype)).items() if k != "tokens"} for name, path in reference.items()}
    summary = {"dam": {"compute": dam, "seconds": dam_seconds, "report": args.dam_report, "formula": "4 * report['tokens']"},
               "budget_multiples": multiples, "threads": torch.get_num_threads(), "methods": records,
               "reference_fitness": fitness}
    summary["compare_command"] = compare_command(manifest, args.out, records, args.dam_model, dam, simple)
    with open(os.path.join(args.out, "evolution.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    print("\n| method | budget | compute | evaluations | wall s | fitness | calibration exact match | calibration NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for method, record in records.items():
        for entry in record["budgets"]:
            scores = entry.get("scores", {})
            print(f"| {method} | {entry['multiple']:g}x{'' if entry['reached'] else ' (not reached)'} | {entry['compute']:.3g} | "
                  f"{entry['evaluations']} | {entry['wall_seconds']:.0f} | {entry.get('fitness', float('nan')):.4f} | "
                  f"{scores.get('accuracy', float('nan')):.3f} | {scores.get('nll', float('nan')):.3f} |")
    for name, result in fitness.items():  # DAM's row: its training compute and seconds
        compute, wall = (f"{dam:.3g}", f"{dam_seconds:.0f}" if dam_seconds else "") if name == "dam" else ("0", "")
        print(f"| {name} | | {compute} | | {wall} | {result['fitness']:.4f} | {result['accuracy']:.3f} | {result['nll']:.3f} |")
    print(f"\nDAM: {dam:.4g} forward-token equivalents" + (f", {dam_seconds:.0f} s" if dam_seconds else ""))
    print("held-out scores:\n" + summary["compare_command"])
    if args.held_out:  # the same command, run here: one command from search to the held-out table and chart
        import shlex

        from mergekit_dam.cli import main as mergekit_dam

        return mergekit_dam(["-q", *shlex.split(summary["compare_command"])[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
