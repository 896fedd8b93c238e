"""The one GPU call: every GPU check of the project, most valuable first, each step
time-boxed, each result appended to <out>/gpu_check.json as soon as it finishes (a run
cut off at its limit still reports what ran).

    bash benchmarks/gpu_check.sh [DEADLINE_S]                  # on a GPU machine (sets it up first)
    python benchmarks/gpu_check.py --out DIR --deadline 450      # the steps alone
    python benchmarks/gpu_check.py --out DIR --smoke             # the same steps at tiny geometry on CPU

Steps, in order:
  gpu_tests             `pytest -m gpu`: the fused kernels against the plain path, training
                        on cuda (float32 and bf16 against the CPU run, top-K, resume,
                        determinism), mergekit --cuda / --read-to-gpu / --multi-gpu apply, a
                        one-process NCCL launch (FSDP on a world of one)
  merge_kernels         the merge and its coefficient gradient alone at 7B shapes: plain vs
                        Triton vs the memory floor
  train_step_{1b,7b}_*  gpu_train_step.py: DAM's step vs the plain-model floor, 3 experts,
                        seq 2048, online and top-K teachers, one change at a time (kernels
                        plain/fused, recompute layer/weights/none); 1B online adds the kernel
                        tables of the floor and of the default step (torch profiler)
  train_1b              the real training stage at 1B (layerwise_peak.py): the estimate vs
                        the measured peak, end-to-end vs layer-wise peak
  apply_1b              apply_vs_linear.py --cuda: `dam` vs `linear` on the same ~1B models
  layerwise_7b          layerwise_peak.py at 7B (writes 42 GB of experts)
A step starts only if its minimum time is left before the deadline.
"""

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def steps(out: str, smoke: bool) -> list:
    """(name, command, result JSON the command writes or None, timeout s, minimum s to start)."""
    py = sys.executable
    tmp = os.path.join(out, "work") if smoke else "/tmp/dam-gpu-check"
    tiny = ["--geometry", "tiny", "--device", "cpu", "--seq", "64"]
    # one hung test (a collective that never returns, say) must not take the whole call
    per_test = ["--timeout", "120"] if importlib.util.find_spec("pytest_timeout") else []
    plan = [("gpu_tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "--durations=10", *per_test,
                           "--junitxml", os.path.join(out, "gpu_tests.xml")], None, 240, 60)]
    result = os.path.join(tmp, "merge_kernels.json")
    args = ["--device", "cpu", "--scale", "64", "--repeats", "3"] if smoke else []
    plan.append(("merge_kernels", [py, os.path.join(HERE, "merge_kernels.py"), *args, "--json", result], result, 90, 30))
    every = ["plain:layer", "fused:layer", "fused:weights", "fused:none"]
    for geometry, teacher, variants, minimum in (("1b", "online", every, 45), ("7b", "online", every, 80),
                                                 ("7b", "topk", ["fused:layer", "fused:weights"], 60), ("1b", "topk", every, 40)):
        name = f"train_step_{geometry}_{teacher}"
        result = os.path.join(tmp, f"{name}.json")
        args = [*tiny, "--warmup", "1", "--repeats", "2"] if smoke else ["--geometry", geometry]
        if name == "train_step_1b_online":
            args += ["--profile", "fused:weights"]
        plan.append((name, [py, os.path.join(HERE, "gpu_train_step.py"), *args, "--teacher", teacher, "--variants", *variants,
                            "--json", result], result, 150, minimum))
        if name == "train_step_7b_online":
            workdir = os.path.join(tmp, "train_1b")
            args = tiny if smoke else ["--geometry", "1b", "--device", "cuda"]
            plan.append(("train_1b", [py, os.path.join(HERE, "layerwise_peak.py"), *args, "--samples", "4", "--steps", "3",
                                      "--workdir", workdir], os.path.join(workdir, "layerwise_peak.json"), 150, 60))
    workdir = os.path.join(tmp, "apply_1b")
    args = ["--hidden", "64", "--layers", "2", "--vocab", "512"] if smoke else ["--hidden", "2048", "--layers", "16", "--cuda"]
    plan.append(("apply_1b", [py, os.path.join(HERE, "apply_vs_linear.py"), *args, "--repeats", "2", "--workdir", workdir],
                 os.path.join(workdir, "apply_vs_linear.json"), 180, 90))
    workdir = os.path.join(tmp, "layerwise_7b")
    args = tiny if smoke else ["--geometry", "7b", "--device", "cuda"]
    plan.append(("layerwise_7b", [py, os.path.join(HERE, "layerwise_peak.py"), *args, "--samples", "2", "--steps", "2", "--workdir", workdir],
                 os.path.join(workdir, "layerwise_peak.json"), 300, 150))
    return plan


def environment() -> dict:
    import torch
    import transformers

    facts = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_GiB=props.total_memory / 2**30, multiprocessors=props.multi_processor_count)
    try:
        from importlib.metadata import version

        import mergekit_dam  # noqa: F401  the installed plugin, not only the source tree

        facts["mergekit"] = version("mergekit")
    except Exception as error:  # reported, not fatal: the steps will say what fails
        facts["mergekit"] = f"unavailable: {error}"
    return facts


def run_step(command: list, timeout: float, log) -> tuple:
    """(exit code or 'timeout', seconds): the command in its own process group, killed whole at the timeout."""
    start = time.perf_counter()
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"})
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = "timeout"
    return code, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--deadline", type=float, default=450, help="seconds from start by which every step has ended")
    parser.add_argument("--smoke", action="store_true", help="tiny geometry on CPU: checks the wiring, measures nothing")
    parser.add_argument("--only", nargs="+", help="run only these steps")
    args = parser.parse_args()
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "gpu_check.json")
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": args.smoke, "environment": environment(), "steps": {}}

    def save():
        with open(results_path + ".tmp", "w") as handle:
            json.dump(results, handle, indent=1)
        os.replace(results_path + ".tmp", results_path)

    save()
    with open(os.path.join(args.out, "gpu_check.log"), "a") as log:
        for name, command, result_file, timeout, minimum in steps(args.out, args.smoke):
            if args.only and name not in args.only:
                continue
            left = args.deadline - (time.perf_counter() - started)
            if left < minimum:
                results["steps"][name] = {"status": "skipped", "why": f"{left:.0f} s left, needs {minimum}"}
                save()
                continue
            if result_file and os.path.exists(result_file):
                os.unlink(result_file)
            os.makedirs(os.path.dirname(result_file or results_path), exist_ok=True)
            code, seconds = run_step(command, min(timeout, left), log)
            entry = {"status": "ok" if code == 0 else "failed", "exit": code, "seconds": round(seconds, 1)}
            if result_file and os.path.exists(result_file):
                with open(result_file) as handle:
                    entry["result"] = json.load(handle)
            results["steps"][name] = entry
            save()
            print(f"{name:22s} {entry['status']:7s} {seconds:6.1f} s", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
