#!/usr/bin/env bash
# The one GPU call, from the repository root of a GPU machine that has python3 with a CUDA
# torch but no mergekit (the lent machines: see BENCHMARKS.md, "GPU check"):
#
#   bash benchmarks/gpu_check.sh [DEADLINE_S [--only STEP ...]]
#
# What the machine lacks travels as wheels in .whl/ (made here beforehand):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl mergekit==0.1.5 ...   (BENCHMARKS.md lists them)
#   pip wheel --no-deps . -w .whl                                     (this plugin, with its .pth hook)
# They go into the machine's own python (the machine is thrown away afterwards), so that
# mergekit-yaml, mergekit-dam and the registration hook are where the tests look for them.
# Results: $OUT (or ./gpu-check-out)/gpu_check.json, gpu_check.log, gpu_tests.xml.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
DEADLINE="${1:-450}"
shift || true
{
    echo "== $(date -u) on $(hostname)"
    nvidia-smi -L || true
    # a warm machine that has these exact wheels installed skips the install
    stamp="$(cat .whl/*.whl | md5sum)"
    if [ "$(cat /tmp/dam-wheels.md5 2>/dev/null)" != "$stamp" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --force-reinstall .whl/*.whl &&
            echo "$stamp" >/tmp/dam-wheels.md5
    fi
} >>"$OUT/gpu_check.log" 2>&1 || { echo "installing the wheels failed; see $OUT/gpu_check.log"; tail -20 "$OUT/gpu_check.log"; exit 1; }
exec python3 benchmarks/gpu_check.py --out "$OUT" --deadline "$DEADLINE" "$@"
