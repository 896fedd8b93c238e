"""Soak: many short `dam` merges through `mergekit-yaml`, two at a time, sharing one cache,
some killed at a random moment (SIGKILL or SIGTERM), then one clean run per training key.
Passes when nothing torn or orphaned is left: every artifact and checkpoint readable and
finite, every report parseable, no temp file or staging folder, no leftover checkpoint,
and every output folder complete.

    python benchmarks/soak.py --work /tmp/dam-soak [--runs 30] [--kill-share 0.4] [--seed 0]

Writes soak.json in --work (runs, kills, files checked, failures). Not part of CI (minutes).
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import torch
import yaml

from mergekit_dam import open_artifact
from mergekit_dam.lab import SKILLS, Recipe, build

SMALL = Recipe(hidden=32, layers=2, pretrain_steps=30, finetune_steps=60, batch=16, calibration=48, validation=16, held_out=16)
BIN = os.path.dirname(sys.executable)


def config(manifest: dict, seed: int, artifact) -> dict:
    models = [{"model": manifest["skills"][s]["expert"], "parameters": {"dataset": manifest["skills"][s]["calibration"]}} for s in SKILLS]
    parameters = {"steps": 40, "max_length": 24, "batch_size": 4, "samples": 32, "seed": seed, "checkpoint_every": 5}
    if artifact:
        parameters["coefficients"] = artifact
    return {"merge_method": "dam", "base_model": manifest["base"], "models": models, "dtype": "float32", "parameters": parameters}


def launch(work: str, manifest: dict, index: int, seed: int, artifact, env: dict):
    path = os.path.join(work, "configs", f"run{index}.yml")
    with open(path, "w") as handle:
        yaml.safe_dump(config(manifest, seed, artifact), handle)
    out = os.path.join(work, "out", f"run{index}")
    return subprocess.Popen([os.path.join(BIN, "mergekit-yaml"), path, out, "--quiet", "--no-write-model-card"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out


def check(work: str) -> dict:
    """Every file left under work/cache, work/artifacts and work/out, checked."""
    checked, failures = 0, []
    for root in ("cache", "artifacts", "out"):
        for folder, dirs, files in os.walk(os.path.join(work, root)):
            for name in dirs + files:
                path = os.path.join(folder, name)
                checked += 1
                if name.startswith(".dam-"):
                    failures.append(f"orphan {path}")
                elif name.endswith(".ckpt"):
                    failures.append(f"leftover checkpoint {path}")
                elif name.endswith(".safetensors") and root != "out":
                    try:
                        artifact = open_artifact(path)
                        for tensor in artifact.shapes:
                            if not torch.isfinite(artifact.get(tensor)).all():
                                failures.append(f"non-finite {path}:{tensor}")
                    except Exception as error:
                        failures.append(f"unreadable {path}: {error}")
                elif name.endswith(".json"):
                    try:
                        with open(path) as handle:
                            json.load(handle)
                    except Exception as error:
                        failures.append(f"unparseable {path}: {error}")
    for name in os.listdir(os.path.join(work, "out")):
        folder = os.path.join(work, "out", name)
        if not name.startswith(".") and not {"config.json", "model.safetensors"} <= set(os.listdir(folder)):
            failures.append(f"incomplete output {folder}")
    return {"checked": checked, "failures": failures}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/dam-soak")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--kill-share", type=float, default=0.4)
    parser.add_argument("--keys", type=int, default=4, help="distinct training keys (seeds) the runs share")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chance = random.Random(args.seed)
    for folder in ("cache", "artifacts", "out", "configs"):
        shutil.rmtree(os.path.join(args.work, folder), ignore_errors=True)
        os.makedirs(os.path.join(args.work, folder))
    manifest = build(os.path.join(args.work, "lab"), SMALL, progress=False)
    env = {**os.environ, "MERGEKIT_DAM_CACHE": os.path.join(args.work, "cache"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    started, kills, outcomes = time.perf_counter(), {"SIGKILL": 0, "SIGTERM": 0}, {}

    def artifact_for(seed):  # half the keys in the cache's default place, half at a path of their own
        return os.path.join(args.work, "artifacts", f"c{seed}.safetensors") if seed % 2 else None

    index = 0
    while index < args.runs:
        pair = []
        for _ in range(min(2, args.runs - index)):
            seed = chance.randrange(args.keys)
            pair.append((index, *launch(args.work, manifest, index, seed, artifact_for(seed), env)))
            index += 1
        for run, process, _ in pair:
            if chance.random() < args.kill_share:
                time.sleep(chance.uniform(0.5, 8.0))
                if process.poll() is None:
                    name = chance.choice(["SIGKILL", "SIGTERM"])
                    process.send_signal(getattr(signal, name))
                    kills[name] += 1
                    outcomes[run] = name
        for run, process, _ in pair:
            process.wait()
            outcome = outcomes.setdefault(run, f"exit {process.returncode}")
            if outcome.startswith("exit") and outcome != "exit 0":
                print(f"run {run} failed without being killed:\n{process.stderr.read()[-2000:]}", flush=True)
    # one clean run per key: resumes from what the killed runs left, and must finish
    settle = []
    for seed in range(args.keys):
        process, _ = launch(args.work, manifest, index, seed, artifact_for(seed), env)
        process.wait()
        settle.append(process.returncode)
        index += 1
    result = {"runs": args.runs, "settle_runs": args.keys, "kills": kills, "killed_share": sum(kills.values()) / args.runs,
              "unkilled_failures": sum(1 for o in outcomes.values() if o.startswith("exit") and o != "exit 0"),
              "settle_failures": sum(1 for code in settle if code != 0), "seconds": time.perf_counter() - started}
    result.update(check(args.work))
    result["failure_count"] = len(result["failures"]) + result["unkilled_failures"] + result["settle_failures"]
    with open(os.path.join(args.work, "soak.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))
    sys.exit(1 if result["failure_count"] else 0)


if __name__ == "__main__":
    main()
