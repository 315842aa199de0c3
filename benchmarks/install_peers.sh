#!/usr/bin/env bash
# Install the peers of benchmarks/speed.py --compare into the active environment (the
# `python` on PATH, or $PYTHON): higher torchopt parallel_metalearn jax learn2learn, or the
# ones named: `bash benchmarks/install_peers.sh [--strict] [PEER ...]`.
#   higher 0.2.1, torchopt 0.7.3, parallel_metalearn 0.5.6 (imports as `metalearn`),
#   jax + jaxlib 0.10.2 with optax 0.2.8; learn2learn through install_learn2learn.sh.
# Under a constraint pinning the installed torch, torchvision and numpy, so pip never
# changes them (checked after). Idempotent: a peer that already imports at its version is
# skipped. A peer that cannot be installed or imported here gets one line saying why and
# the others go on; exit 0 unless --strict. TorchOpt's compiled _C is built for the torch of
# its release: when it does not load, TorchOpt runs its Python ops (the ones the port uses).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
STRICT=0
if [[ "${1:-}" == "--strict" ]]; then STRICT=1; shift; fi
PEERS=("$@")
[[ ${#PEERS[@]} -gt 0 ]] || PEERS=(higher torchopt parallel_metalearn jax learn2learn)

declare -A SPECS=(
    [higher]="higher==0.2.1"
    [torchopt]="torchopt==0.7.3"
    [parallel_metalearn]="parallel_metalearn==0.5.6"
    [jax]="jax==0.10.2 jaxlib==0.10.2 optax==0.2.8"
)
declare -A MODULES=([higher]=higher [torchopt]=torchopt [parallel_metalearn]=metalearn [jax]="jax, optax")
declare -A DISTS=([higher]=higher [torchopt]=torchopt [parallel_metalearn]=parallel_metalearn [jax]=jax)

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "install_peers: torch and torchvision must be installed first (pip install -e .)" >&2
    exit 1
fi
versions() { "$PY" -c "from importlib.metadata import version as v; print(v('torch'), v('torchvision'), v('numpy'))"; }
before="$(versions)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
read -r torch_v vision_v numpy_v <<<"$before"
printf 'torch==%s\ntorchvision==%s\nnumpy==%s\n' "$torch_v" "$vision_v" "$numpy_v" >"$work/constraints.txt"

failed=0
for peer in "${PEERS[@]}"; do
    if [[ "$peer" == learn2learn ]]; then
        bash benchmarks/install_learn2learn.sh >"$work/l2l.log" 2>&1 \
            && echo "install_peers: learn2learn $(tail -1 "$work/l2l.log" | awk '{print $3}') imports" \
            || { echo "install_peers: learn2learn not installed: $(tail -1 "$work/l2l.log")"; failed=1; }
        continue
    fi
    spec="${SPECS[$peer]:-}"
    if [[ -z "$spec" ]]; then echo "install_peers: unknown peer $peer (peers: ${!SPECS[*]} learn2learn)"; failed=1; continue; fi
    want="$(echo "$spec" | cut -d' ' -f1 | cut -d= -f3)"
    probe="import ${MODULES[$peer]}; from importlib.metadata import version; import sys; sys.exit(version('${DISTS[$peer]}') != '$want')"
    if "$PY" -c "$probe" 2>/dev/null; then echo "install_peers: $peer $want already imports"; continue; fi
    # shellcheck disable=SC2086
    if ! PIP_CONSTRAINT= "$PY" -m pip install --quiet -c "$work/constraints.txt" $spec >"$work/pip.log" 2>&1; then
        echo "install_peers: $peer not installed: $(grep -E 'ERROR' "$work/pip.log" | head -1 | cut -c1-200)"
        failed=1; continue
    fi
    if "$PY" -c "$probe" 2>"$work/import.log"; then
        echo "install_peers: $peer $want imports"
    else
        echo "install_peers: $peer installed but does not import: $(tail -1 "$work/import.log" | cut -c1-200)"
        failed=1
    fi
done

after="$(versions)"
if [[ "$before" != "$after" ]]; then
    echo "install_peers: torch/torchvision/numpy changed ($before -> $after)" >&2
    exit 1
fi
if [[ $STRICT -eq 1 && $failed -ne 0 ]]; then exit 1; fi
exit 0
