"""ComfyUI adapters for mixofshow_core: one capability per module."""
from .edlora_loader import EDLoRALoader
from .edlora_text_encode import EDLoRATextEncode

NODE_CLASS_MAPPINGS = {
    "MixOfShowEDLoRALoader": EDLoRALoader,
    "MixOfShowEDLoRATextEncode": EDLoRATextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MixOfShowEDLoRALoader": "EDLoRA Loader",
    "MixOfShowEDLoRATextEncode": "EDLoRA Text Encode",
}
