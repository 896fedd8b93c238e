"""Start-up cost of the registration hook in processes that never use mergekit.

    python benchmarks/startup.py [--runs 200]

Measures (1) in-process: site.addpackage() on mergekit_dam.pth, i.e. what every
interpreter start pays (read the .pth, import the stdlib-only hook module, install a
meta-path finder), and (2) `python -X importtime -c "import json"` in fresh processes:
the hook module's own import time, and that neither torch nor mergekit get imported.
"""

import argparse
import json
import os
import re
import site
import statistics
import subprocess
import sys
import sysconfig
import time


def in_process(runs: int) -> list:
    sitedir = sysconfig.get_paths()["purelib"]
    assert os.path.exists(os.path.join(sitedir, "mergekit_dam.pth")), "install mergekit-dam first"
    timings = []
    for _ in range(runs):
        sys.modules.pop("_mergekit_dam_autoload", None)
        sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") != "_RegisterDamFinder"]
        start = time.perf_counter()
        site.addpackage(sitedir, "mergekit_dam.pth", set())
        timings.append(time.perf_counter() - start)
    return timings


def fresh_processes(runs: int) -> dict:
    own, wall, heavy = [], [], set()
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import json, sys; print(json.dumps(sorted(sys.modules)))"],
            capture_output=True, text=True, check=True,
        )
        wall.append(time.perf_counter() - start)
        heavy |= {m for m in json.loads(result.stdout) if m.split(".")[0] in ("torch", "mergekit", "mergekit_dam")}
        line = re.search(r"import time:\s+(\d+) \|\s+(\d+) \|\s+_mergekit_dam_autoload", result.stderr)
        own.append(int(line.group(2)) if line else 0)
    return {"hook_import_us": own, "process_wall_s": wall, "heavy_modules": sorted(heavy)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    inner = in_process(args.runs)
    outer = fresh_processes(max(10, args.runs // 10))
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cores")
    print(f"site.addpackage(mergekit_dam.pth): median {statistics.median(inner) * 1e3:.3f} ms, "
          f"p90 {sorted(inner)[int(0.9 * len(inner))] * 1e3:.3f} ms over {len(inner)} runs")
    print(f"-X importtime, hook module (cumulative): median {statistics.median(outer['hook_import_us'])} us "
          f"over {len(outer['hook_import_us'])} fresh processes")
    print(f"`python -c 'import json'` wall: median {statistics.median(outer['process_wall_s']) * 1e3:.1f} ms")
    print(f"torch/mergekit modules imported by `import json`: {outer['heavy_modules'] or 'none'}")


if __name__ == "__main__":
    main()
