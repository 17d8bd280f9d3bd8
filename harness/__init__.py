"""Development harness: embedded ComfyUI host, server control, seeded test models.

Never imported by ComfyUI; tests and the demo use it."""
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_mixofshow"


def register_plugin_package():
    """Makes the plugin folder importable as `comfyui_mixofshow` without running its __init__."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        package.__file__ = str(ROOT / "__init__.py")
        sys.modules[PACKAGE] = package
    return sys.modules[PACKAGE]
