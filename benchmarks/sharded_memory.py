"""Memory per process of sharded (FSDP2) DAM training vs the number of processes.

    python benchmarks/sharded_memory.py --hidden 256 512 1024 --processes 1 2 4

For each geometry (Llama-style, 4 layers, 3 experts, float32 on CPU with gloo), runs the
real `mergekit-dam train` path under torchrun with W processes and records, per rank,
from just before training (after imports) to its end:
  resident  growth of anonymous memory (RssAnon) still held after training: the rank's
            share of the experts and coefficients;
  peak      growth of the peak RSS (VmHWM): resident + gathered layers, buffers, activations,
            and the checkpoint pages each rank maps to read its tensors (RssFile).
glibc is told to return large blocks to the system (MALLOC_MMAP_THRESHOLD_), so that
freed tensors do not stay in the process's RSS. Prints a table, writes sharded_memory.json.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.abspath(__file__)


def status() -> dict:
    with open("/proc/self/status") as handle:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))}


def worker(config_path: str, out_json: str) -> None:
    from mergekit.merge import MergeOptions

    from mergekit_dam.api import train
    from mergekit_dam.training import distributed

    before = status()
    train(config_path, MergeOptions(quiet=True))
    after = status()
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out_json}.{rank}", "w") as handle:
        json.dump({"rank": rank, "resident": after["RssAnon"] - before["RssAnon"], "peak": after["VmHWM"] - before["VmRSS"]}, handle)
    distributed.shutdown()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="/tmp/dam-sharded-memory")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "JSON"))
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    import yaml

    from mergekit_dam.lab.tiny import make_family

    rows = []
    for hidden in args.hidden:
        root = os.path.join(args.out, f"h{hidden}")
        base, *experts = make_family(root, "llama", hidden=hidden, layers=args.layers, experts=3)
        data = os.path.join(root, "data.jsonl")
        with open(data, "w") as handle:
            for index in range(8):
                handle.write(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 4 + str(index)}) + "\n")
        params = sum(os.path.getsize(os.path.join(experts[0], f)) for f in os.listdir(experts[0]) if f.endswith(".safetensors"))
        for world in args.processes:
            config = {"merge_method": "dam", "base_model": base, "dtype": "float32",
                      "models": [{"model": m, "parameters": {"dataset": data}} for m in experts],
                      "parameters": {"coefficients": os.path.join(root, f"w{world}.safetensors"), "steps": 2, "grad_accum": world,
                                     "max_length": 64, "samples": 8, "train_device": "cpu", "retrain": True}}
            config_path = os.path.join(root, f"w{world}.yml")
            with open(config_path, "w") as handle:
                yaml.safe_dump(config, handle)
            out_json = os.path.join(root, f"w{world}.json")
            command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node", str(world),
                       HERE, "--worker", config_path, out_json]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
            subprocess.run(command, check=True, capture_output=True, env=env)
            ranks = [json.load(open(f"{out_json}.{r}")) for r in range(world)]
            resident, peak = max(r["resident"] for r in ranks), max(r["peak"] for r in ranks)
            rows.append({"hidden": hidden, "expert_bytes_total": 3 * params, "processes": world, "resident": resident, "peak": peak})
            print(f"hidden {hidden:5d}  experts {3 * params / 2**20:7.1f} MiB  W={world}  per rank: resident {resident / 2**20:7.1f} MiB "
                  f"({resident / (3 * params):.2f} x experts), peak {peak / 2**20:7.1f} MiB", flush=True)
    with open(os.path.join(args.out, "sharded_memory.json"), "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
