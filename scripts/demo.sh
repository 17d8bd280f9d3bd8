#!/usr/bin/env bash
# The main job: the whole Mix-of-Show flow (train -> fuse -> regional sample) through a real,
# headless ComfyUI server's API.
#   bash scripts/demo.sh                       # random demo model, two concepts trained on drawings (images are noise)
#   bash scripts/demo.sh --checkpoint SD15.safetensors --edlora A.pth B.pth [--train FOLDER=man] [--prompt "..."]
# See `bash scripts/demo.sh --help` (also MIXOFSHOW_CHECKPOINT / MIXOFSHOW_EDLORA / MIXOFSHOW_PROMPT).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python harness/demo.py "$@"
