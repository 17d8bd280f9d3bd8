#!/usr/bin/env bash
# Sets up the environment (scripts/setup_env.sh) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k server -x`.
# MIXOFSHOW_COMFYUI=/path/to/ComfyUI runs the tests against that checkout instead of the embedded host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -c tests/pytest.ini tests "$@"
