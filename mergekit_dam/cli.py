"""`mergekit-dam`: the plugin's own commands (the merge itself runs in `mergekit-yaml`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mergekit_dam.core.errors import DamError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergekit-dam", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    # -q also after the subcommand (SUPPRESS: a subcommand without it keeps the top-level value)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or info logs")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(subparsers, name: str, text: str, **kwargs) -> argparse.ArgumentParser:
        """A subcommand whose one-line `text` is both its line in the list and its own --help."""
        return subparsers.add_parser(name, help=text, description=text, **kwargs)

    demo = command(commands, "demo", "build (or reuse) the merge lab and merge its four experts six ways through stock "
                   "mergekit: dam and dam with the lab's general text as retain_dataset (a mergekit-yaml run each), then "
                   "linear, task arithmetic, TIES and DARE-TIES (one mergekit-multi run); check the dam merges against "
                   "their coefficients and score every model on held-out data", parents=[quiet])
    demo.add_argument("workdir", nargs="?", default="dam-demo", help="where the lab, configs, artifacts, merges and the "
                      "comparison (compare/compare.{md,json,png}) go")
    train = command(commands, "train", "learn the coefficients of a dam config without merging (under torchrun: sharded "
                    "over its processes)", parents=[quiet])
    train.add_argument("config", help="mergekit YAML config with merge_method: dam")
    train.add_argument("--out", help="artifact path (overrides the config's `coefficients`)")
    train.add_argument("--trust-remote-code", action="store_true", help="as mergekit's flag")
    train.add_argument("--transformers-cache", help="as mergekit's flag")
    train.add_argument("--lora-merge-cache", help="as mergekit's flag")
    lab = command(commands, "lab", "the offline merge lab").add_subparsers(dest="lab_command", required=True)
    lab_build = command(lab, "build", "build the tiny lab (reused while its recipe is unchanged): a base, four experts, "
                        "their calibration, validation and held-out data, lm-eval tasks", parents=[quiet])
    lab_build.add_argument("dir", nargs="?", default="dam-lab", help="the lab's folder (default: dam-lab)")
    _compare_parser(command(commands, "compare", "score models on held-out skill data (and lm-eval tasks); table, JSON, "
                            "chart", parents=[quiet]))
    inspect = command(commands, "inspect", "an artifact's mean coefficients per model and module type; JSON, layer x "
                      "model heatmap and dominance chart", parents=[quiet])
    inspect.add_argument("artifact", help="a coefficient artifact (.safetensors) that DAM wrote")
    inspect.add_argument("--out", help="output dir (default: the artifact's path without its extension, plus .inspect)")
    return parser


def _compare_parser(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("models", nargs="+", help="model dirs, as PATH or NAME=PATH")
    compare.add_argument("--lab", help="lab dir: its held-out data, experts, base and general text")
    compare.add_argument("--skill", action="append", default=[], metavar="NAME=FILE", help="held-out jsonl per skill")
    compare.add_argument("--expert", action="append", default=[], metavar="NAME=DIR", help="a skill's expert (for KL)")
    compare.add_argument("--general", help="general-text jsonl (forgetting)")
    compare.add_argument("--base", help="base model dir (for retention)")
    compare.add_argument("--out", default="dam-compare", help="where compare.json/.md/.png go")
    compare.add_argument("--lm-eval", metavar="TASKS", help="also run these lm-evaluation-harness tasks, groups or tags "
                         "on every model (comma-separated, e.g. gsm8k,arc_challenge; the lab's: dam_lab); needs "
                         "pip install mergekit-dam[eval]")
    compare.add_argument("--lm-eval-include", metavar="DIR", help="more lm-eval task YAMLs (lm-eval's include_path; "
                         "default with --lab: the lab's tasks)")
    compare.add_argument("--lm-eval-limit", type=int, metavar="N", help="only the first N examples of each lm-eval task")
    compare.add_argument("--lm-eval-batch-size", default="8", metavar="B", help="lm-eval's batch size, or auto (default: 8)")
    compare.add_argument("--compute", action="append", default=[], metavar="NAME=FLOAT",
                         help="what making model NAME cost, in forward-token equivalents (0: no search): adds a compute "
                              "column and quality-vs-compute panels")


def run_demo(args) -> None:
    from mergekit_dam.lab.demo import run_demo as demo

    demo(args.workdir, quiet=args.quiet)


def run_train(args) -> None:
    from mergekit.merge import MergeOptions

    from mergekit_dam.api import train
    from mergekit_dam.training import distributed

    options = MergeOptions(quiet=args.quiet, trust_remote_code=args.trust_remote_code,
                           transformers_cache=args.transformers_cache, lora_merge_cache=args.lora_merge_cache)
    source = train(args.config, options, out=args.out)
    if distributed.is_main():
        print(source.artifact_path or "no datasets configured: equal coefficients 1/N, nothing to train")
    distributed.shutdown()


def run_lab(args) -> None:
    from mergekit_dam.lab.builder import build

    print(json.dumps(build(args.dir, progress=not args.quiet), indent=1))


def run_inspect(args) -> None:
    from mergekit_dam.tools.inspect_artifact import report, summarize, text_summary

    outputs = report(args.artifact, args.out)
    print(text_summary(summarize(args.artifact)))
    print(f"\nJSON: {outputs['json']}\nheatmap: {outputs['heatmap']}\ndominance: {outputs['dominance']}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet and args.command != "inspect":  # transformers' bars (loading, writing models) heed its own switch
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    handlers = {"demo": run_demo, "train": run_train, "lab": run_lab, "compare": run_compare, "inspect": run_inspect}
    try:
        handlers[args.command](args)
    except DamError as error:
        print(f"mergekit-dam error: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:  # a path the user gave
        where = f" {error.filename}" if error.filename else ""
        print(f"mergekit-dam error: cannot use{where} ({error.strerror or error}); check the path", file=sys.stderr)
        return 1
    return 0


def _pairs(values, what):
    result = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise DamError(f"dam: {what} `{value}` must be NAME=PATH")
        result[name] = path
    return result


def run_compare(args) -> None:
    import os

    from mergekit_dam.tools.compare import Suite, markdown, score, write_outputs

    lab = None
    if args.lab:
        with open(os.path.join(args.lab, "lab.json"), encoding="utf-8") as handle:
            lab = json.load(handle)
        suite = Suite.from_lab(lab)
    else:
        suite = Suite(skills=_pairs(args.skill, "--skill"), experts=_pairs(args.expert, "--expert"), general=args.general, base=args.base)
        if not suite.skills:
            raise DamError("dam: compare needs held-out data: --lab DIR or --skill NAME=FILE")
    models = {}
    for value in args.models:
        name, sep, path = value.partition("=")
        models[name if sep else os.path.basename(value.rstrip("/"))] = path if sep else value
    compute = _compute(args.compute, models)
    lm_eval = lm_eval_runner(args, lab) if args.lm_eval else None
    results = score(models, suite)
    for name, value in compute.items():
        results[name]["compute"] = value
    if lm_eval:
        for name, scores in lm_eval(models).items():
            results[name]["lm_eval"] = scores
    outputs = write_outputs(results, args.out)
    print(markdown(results))
    print(f"\nJSON: {outputs['json']}\ntable: {outputs['table']}\nchart: {outputs['chart']}")


def _compute(values, models) -> dict:
    """--compute NAME=FLOAT: {model name: forward-token equivalents}, for models being compared."""
    result = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name or not text:
            raise DamError(f"dam: --compute `{value}` must be NAME=FLOAT")
        if name not in models:
            raise DamError(f"dam: --compute names {name}, which is not among the models ({', '.join(models)})")
        try:
            result[name] = float(text)
        except ValueError:
            raise DamError(f"dam: --compute {name}={text}: the compute must be a number (forward-token equivalents)") from None
        if not result[name] >= 0:
            raise DamError(f"dam: --compute {name}={text}: the compute must be 0 or more")
    return result


def lm_eval_runner(args, lab):
    """models -> lm-eval scores, for --lm-eval. Checks that lm-eval is installed and knows
    every task now, before compare spends minutes on its own scoring."""
    from functools import partial

    from mergekit_dam.tools import harness

    harness.require_lm_eval()
    tasks = harness.task_names(args.lm_eval)
    include = args.lm_eval_include or (lab_tasks(lab, args.lab) if lab else None)
    return partial(harness.evaluate, tasks=tasks, manager=harness.task_manager(tasks, include),
                   limit=args.lm_eval_limit, batch_size=args.lm_eval_batch_size)


def lab_tasks(manifest: dict, lab_dir: str) -> str:
    """The lab's lm-eval task folder, which labs built before there were tasks lack."""
    if "lm_eval_tasks" not in manifest:
        raise DamError(f"dam: the lab {lab_dir} has no lm-eval tasks; run `mergekit-dam lab build {lab_dir}` "
                       "(it keeps the models and adds them)")
    return manifest["lm_eval_tasks"]


if __name__ == "__main__":
    sys.exit(main())
