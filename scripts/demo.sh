#!/usr/bin/env bash
# The demo: one ED-LoRA txt2img image through a real, headless ComfyUI server.
#   bash scripts/demo.sh                       # random demo model (the image is noise)
#   bash scripts/demo.sh --checkpoint SD15.safetensors --edlora CONCEPT.pth [--prompt "a photo of <w1> <w2>"]
# See `bash scripts/demo.sh --help` (also MIXOFSHOW_CHECKPOINT / MIXOFSHOW_EDLORA / MIXOFSHOW_PROMPT).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python harness/demo.py "$@"
