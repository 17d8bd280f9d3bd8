"""Test-harness stand-in for torchvision (never shipped with the plugin).

The embedded 2024 ComfyUI imports torchvision at import time but only uses it for
Stable Cascade and LaMa, which the tests never run. The pinned CPU torch has no
matching torchvision wheel, so this stand-in satisfies the imports and fails loudly
if anything is actually called. A real torchvision, when installed, shadows it.
"""
__version__ = "0.0.0+mixofshow.shim"

from . import models, transforms  # noqa: E402,F401
