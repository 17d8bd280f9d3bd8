"""Makes the plugin importable for a benchmark run as a script (sys.path[0] is benchmarks/):

    import _bootstrap
    _bootstrap.add_host(cpu=True)  # before the first `import comfy...`
"""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def register_plugin():
    """Registers the repo as the package `comfyui_mixofshow` without running its ComfyUI __init__
    (harness/__init__.py, loaded by file name since the package does not exist yet)."""
    spec = importlib.util.spec_from_file_location("_mixofshow_bootstrap", ROOT / "harness" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.register_plugin_package()


def add_host(cpu):
    """Registers the plugin and puts the ComfyUI host on sys.path; `cpu` selects the CPU."""
    register_plugin()
    from comfyui_mixofshow.harness import host
    return host.add_host_to_path(cpu=cpu)
