#!/usr/bin/env bash
# Installs what the region editor browser tests (tests/browser) need, idempotently:
#   chromium     Debian's package (apt-get), driven headless; PLAYWRIGHT'S OWN BROWSER DOWNLOAD IS NOT USED
#   playwright   the Python package (it ships its node driver) in the test venv
#   frontend     comfyui-frontend-package==1.58.1 (PyPI, --no-deps) in .host/frontends/1.58.1, outside the
#                tracked tree; the tests serve it with --front-end-root (MIXOFSHOW_FRONTEND=1.58.1, 1.58.1-vue)
# When one of them is missing the browser tests skip, naming it.
# Environment: PYTHON (interpreter whose environment gets playwright, default .venv/bin/python),
#              MIXOFSHOW_CHROMIUM (use that chromium binary; skips apt-get).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
PLAYWRIGHT="playwright==1.65.2"
FRONTEND_VERSION=1.58.1
start=$(date +%s)

chromium=${MIXOFSHOW_CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$chromium" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup_browser: apt-get install chromium"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    chromium=$(command -v chromium)
fi

if ! "$PY" -c 'import playwright.sync_api' >/dev/null 2>&1; then
    echo "setup_browser: pip install $PLAYWRIGHT into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install --disable-pip-version-check --progress-bar off -q "$PLAYWRIGHT"
fi

frontend=.host/frontends/$FRONTEND_VERSION
if [ ! -f "$frontend/comfyui_frontend_package/static/index.html" ]; then
    echo "setup_browser: pip install --no-deps comfyui-frontend-package==$FRONTEND_VERSION into $frontend"
    rm -rf "$frontend.partial"
    "$PY" -m pip install --disable-pip-version-check --progress-bar off -q --no-deps --no-compile \
        --target "$frontend.partial" "comfyui-frontend-package==$FRONTEND_VERSION"
    rm -rf "$frontend"
    mv "$frontend.partial" "$frontend"
fi

# one launch of the system chromium through playwright proves the pair works
"$PY" - "$chromium" <<'PYEOF'
import sys
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=sys.argv[1], args=["--no-sandbox", "--disable-gpu"])
    print("setup_browser:", sys.argv[1], browser.version)
    browser.close()
PYEOF
echo "setup_browser: ready in $(( $(date +%s) - start )) s"
