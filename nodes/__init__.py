"""ComfyUI adapters for mixofshow_core: one capability per module."""
from .edlora_loader import EDLoRALoader
from .edlora_text_encode import EDLoRATextEncode
from .edlora_train import EDLoRATrain
from .region_prompt import RegionPrompt, RegionPromptImport
from .regional_sampler import ApplyRegions, RegionalSampler

NODE_CLASS_MAPPINGS = {
    "MixOfShowEDLoRALoader": EDLoRALoader,
    "MixOfShowEDLoRATextEncode": EDLoRATextEncode,
    "MixOfShowRegionPrompt": RegionPrompt,
    "MixOfShowRegionPromptImport": RegionPromptImport,
    "MixOfShowApplyRegions": ApplyRegions,
    "MixOfShowRegionalSampler": RegionalSampler,
    "MixOfShowEDLoRATrain": EDLoRATrain,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MixOfShowEDLoRALoader": "EDLoRA Loader",
    "MixOfShowEDLoRATextEncode": "EDLoRA Text Encode",
    "MixOfShowRegionPrompt": "Region Prompt",
    "MixOfShowRegionPromptImport": "Region Prompt Import",
    "MixOfShowApplyRegions": "Apply Regions",
    "MixOfShowRegionalSampler": "Regional Sampler",
    "MixOfShowEDLoRATrain": "EDLoRA Train",
}
