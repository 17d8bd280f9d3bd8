#!/usr/bin/env bash
# The Comfy registry's checks on this package, offline:
#   comfy node validate   pyproject.toml as `comfy node publish` reads it, plus its ruff security rules
#   comfy node pack       the archive publish would upload; its file list must hold the plugin (nodes,
#                         core, web, UI workflows, LICENSE) and none of .comfyignore's dev files
# comfy-cli comes from PyPI into .venv-comfy-cli (once); it needs no network to run (telemetry off).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
COMFY_CLI="comfy-cli==1.23.0"
VENV=.venv-comfy-cli
if [ ! -x "$VENV/bin/comfy" ]; then
    echo "check_package: installing $COMFY_CLI into $VENV"
    "${PYTHON:-python3.11}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "$COMFY_CLI"
fi
comfy=("$VENV/bin/comfy" --skip-prompt --no-enable-telemetry)
mkdir -p out
"${comfy[@]}" node validate </dev/null 2>&1 | tee out/comfy-validate.log
if grep -qi "warning" out/comfy-validate.log; then
    echo "check_package: comfy node validate printed warnings (above)" >&2
    exit 1
fi
rm -f node.zip
"${comfy[@]}" node pack </dev/null >/dev/null
mv node.zip out/node.zip
"$VENV/bin/python" - out/node.zip <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
dev = [n for n in names if n.split("/")[0] in {"tests", "harness", "scripts", "benchmarks", ".ci"}
       or n in {"requirements-dev.txt", ".gitignore", ".comfyignore"}]
needed = ["__init__.py", "pyproject.toml", "LICENSE", "README.md", "requirements.txt", "nodes/__init__.py",
          "mixofshow_core/__init__.py", "web/region_editor.js", "workflows/edlora_txt2img.json",
          "workflows/api/edlora_txt2img_api.json"]
missing = [n for n in needed if n not in names]
if dev or missing:
    sys.exit(f"check_package: archive has dev files {dev} / lacks {missing}")
print(f"check_package: comfy node validate passed; the archive holds {len(names)} files, no dev files")
PYEOF
