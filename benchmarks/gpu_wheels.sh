#!/usr/bin/env bash
# Prepare, on a machine with the package index, what benchmarks/gpu_check.py needs on a
# GPU machine that has none. That machine (docs/gpu.md) has Python
# 3.12 with torch, torchvision, pytorch-lightning, torchmetrics, numpy, scipy, pillow,
# requests, tqdm, pyyaml, cloudpickle and pytest, and lacks:
#   jsonargparse (LightningCLI, train.py) and its [signatures] extra: docstring-parser,
#     typeshed-client;
#   learn2learn 0.2.0 (the speed baseline), which has no wheel: built here for CPython
#     3.12 from its sdist (benchmarks/install_learn2learn.sh --wheel), plus what
#     `import learn2learn` needs beyond that machine's packages: gym and gym-notices
#     (qpth, cvxpy, gsutil are never imported by what we use);
#   the torch peers of speed.py --compare: higher 0.2.1, parallel_metalearn 0.5.6 and
#     torchopt 0.7.3 (py3-none-any for 3.12: its Python ops only) with torchopt's optree
#     (a cp312 wheel) and graphviz. JAX is a CPU-only peer and is not carried.
# Output, both git-ignored, both named in the device call's `carry`:
#   .whl/                 the wheels, each py3-none-any or cp312, one version of each
#   .gpu_data/omniglot/   the two Omniglot npz packs (5.7 MB), copied from OMNIGLOT_DIR
# Usage: bash benchmarks/gpu_wheels.sh [OMNIGLOT_DIR]    (default: ../shared/data/omniglot)
# A Python 3.12 for the learn2learn build: $PY312, else python3.12 on PATH, else pyenv's.
# Without one .whl gets no learn2learn, and gpu_check.py's speed cases say so in their JSON.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
DATA=.gpu_data
OMNIGLOT="${1:-../shared/data/omniglot}"
# Versions tested with lit_meta (CI's environment); pure Python, so one file serves 3.12.
PURE=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 gym-notices==0.1.0)
GYM=gym==0.26.2  # an sdist only: built into a py3-none-any wheel here
# The torch peers (benchmarks/install_peers.sh's versions); optree has compiled cp312 wheels.
PEERS=(higher==0.2.1 parallel_metalearn==0.5.6 torchopt==0.7.3 optree==0.20.0 graphviz==0.21)

rm -rf "$WHEELS" && mkdir -p "$WHEELS"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d "$WHEELS" "${PURE[@]}"
python3 -m pip wheel --quiet --no-deps -w "$WHEELS" "$GYM"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" "${PEERS[@]}" \
    || echo "gpu_wheels: the torch peers' wheels did not download: gpu_check.py reports them absent" >&2

is_312() { "$1" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" >/dev/null 2>&1; }
py312=""
for candidate in "${PY312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    # (a pyenv shim answers `command -v` but may not run: try each)
    if [[ -n "$candidate" ]] && is_312 "$candidate"; then py312="$candidate"; break; fi
done
if [[ -n "$py312" ]]; then
    PYTHON="$py312" bash benchmarks/install_learn2learn.sh --wheel "$WHEELS"
else
    echo "gpu_wheels: no Python 3.12 found (set PY312): .whl has no learn2learn; the speed baseline will be skipped" >&2
fi

# Every file must install on CPython 3.12 with no compiler: pure Python or a cp312 build.
for wheel in "$WHEELS"/*.whl; do
    tags="$(basename "$wheel" .whl | rev | cut -d- -f1-3 | rev)"
    case "$tags" in
        py3-none-any|py2.py3-none-any|cp312-cp312-*) ;;
        *) echo "gpu_wheels: $wheel is tagged $tags, not py3-none-any or cp312" >&2; exit 1 ;;
    esac
done
dupes="$(ls "$WHEELS" | cut -d- -f1 | tr 'A-Z_' 'a-z-' | sort | uniq -d)"
if [[ -n "$dupes" ]]; then echo "gpu_wheels: two versions of: $dupes" >&2; exit 1; fi

rm -rf "$DATA" && mkdir -p "$DATA/omniglot"
if [[ -f "$OMNIGLOT/images_background.npz" && -f "$OMNIGLOT/images_evaluation.npz" ]]; then
    cp "$OMNIGLOT"/images_background.npz "$OMNIGLOT"/images_evaluation.npz "$DATA/omniglot/"
else
    echo "gpu_wheels: no Omniglot packs in $OMNIGLOT: gpu_check.py will fit on a synthetic Omniglot-shaped pool" >&2
fi

ls -la "$WHEELS" "$DATA/omniglot"
echo "gpu_wheels: $(du -sh "$WHEELS" | cut -f1) of wheels, $(du -sh "$DATA" | cut -f1) of data; carry [\"$WHEELS\", \"$DATA\"]"
