"""Mix-of-Show for ComfyUI: ED-LoRA concepts, gradient fusion and regional sampling."""
from .nodes.compat import V3_IO
from .nodes.paths import register_model_folders, remove_leftovers

register_model_folders()
remove_leftovers()

WEB_DIRECTORY = "./web"

if V3_IO is not None:  # V3 nodes; the host would take NODE_CLASS_MAPPINGS instead if it were defined
    from .nodes.v3 import comfy_entrypoint
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
