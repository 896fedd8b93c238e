#!/usr/bin/env bash
# Run mergekit 0.1.5's own upstream test suite against the *installed* mergekit.
#
# Usage: .ci/mergekit_suite.sh PYTHON
#   PYTHON  interpreter of a venv where mergekit==0.1.5, pytest (>=8.4,<9) and
#           (for the point of the exercise) mergekit-dam are installed.
#
# The suite ships in the PyPI sdist but without tests/common.py and
# tests/__init__.py; our own implementations of those live in
# tests/mergekit_upstream/ of this repo and are copied in. The sdist's bundled
# mergekit/ sources (and its egg-info) are deleted so that `import mergekit`
# resolves to site-packages, i.e. the mergekit that mergekit-dam is installed
# into. pytest runs from the extracted sdist root with the sdist's own
# pyproject.toml as its config, so nothing from this repo's pytest config or
# conftest files is picked up. Exits with pytest's exit status.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 PYTHON" >&2
    exit 2
fi
PY="$1"
# We cd into the temp dir below, so make a relative interpreter path absolute
# (without resolving symlinks: a venv's python must stay inside its venv).
if [[ "$PY" == */* ]]; then
    PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
fi
MERGEKIT_VERSION="0.1.5"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HELPERS="$HERE/../tests/mergekit_upstream"
for f in common.py __init__.py; do
    if [[ ! -f "$HELPERS/$f" ]]; then
        echo "missing helper $HELPERS/$f" >&2
        exit 2
    fi
done

TMP="$(mktemp -d "${TMPDIR:-/tmp}/mergekit-suite.XXXXXX")"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

"$PY" -m pip download --no-deps --no-binary :all: \
    "mergekit==$MERGEKIT_VERSION" -d "$TMP" >&2
tar -xzf "$TMP/mergekit-$MERGEKIT_VERSION.tar.gz" -C "$TMP"
ROOT="$TMP/mergekit-$MERGEKIT_VERSION"

# Test the installed mergekit, not the copy bundled in the sdist. pytest's
# default "prepend" import mode puts $ROOT on sys.path for the `tests` package
# (and `python -m` adds the cwd), so these must not exist there.
rm -rf "$ROOT/mergekit" "$ROOT/mergekit.egg-info"
cp "$HELPERS/common.py" "$HELPERS/__init__.py" "$ROOT/tests/"

cd "$ROOT"
# Keep the CI environment's pytest settings (meant for our own suite) out.
unset PYTEST_ADDOPTS PYTEST_PLUGINS
# The suite builds its models locally; never reach for the Hugging Face Hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

MERGEKIT_FILE="$("$PY" -c 'import mergekit; print(mergekit.__file__)')"
case "$MERGEKIT_FILE" in
    "$ROOT"/*)
        echo "mergekit resolves inside the sdist ($MERGEKIT_FILE)" >&2
        exit 2
        ;;
esac
echo "testing installed mergekit at $MERGEKIT_FILE" >&2

status=0
"$PY" -m pytest -q -p no:cacheprovider \
    --rootdir "$ROOT" -c "$ROOT/pyproject.toml" --confcutdir "$ROOT" \
    --basetemp "$TMP/pytest-tmp" \
    tests || status=$?
exit "$status"
