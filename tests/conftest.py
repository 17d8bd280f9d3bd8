"""Makes the plugin folder importable as the package `comfyui_mixofshow`.

The folder is registered without running its `__init__` so that `mixofshow_core` tests
need no ComfyUI; `tests/host/conftest.py` runs the real `__init__` once a host is on the path.
"""
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_mixofshow"

if PACKAGE not in sys.modules:
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(ROOT)]
    package.__file__ = str(ROOT / "__init__.py")
    sys.modules[PACKAGE] = package
