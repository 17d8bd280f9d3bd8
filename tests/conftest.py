"""Makes the plugin folder importable as the package `comfyui_mixofshow`.

The folder is registered without running its `__init__`, so `mixofshow_core` tests need no
ComfyUI; `tests/host/conftest.py` runs the real `__init__` once a host is on the path.
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_mixofshow_bootstrap", Path(__file__).resolve().parents[1] / "harness" / "__init__.py")
_bootstrap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bootstrap)
_bootstrap.register_plugin_package()
