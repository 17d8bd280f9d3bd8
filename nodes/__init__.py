"""ComfyUI adapters for mixofshow_core: one capability per module."""
from .edlora_concept import EDLoRAConcept
from .edlora_loader import EDLoRALoader
from .edlora_text_encode import EDLoRATextEncode
from .edlora_train import EDLoRATrain
from .fused_model import LoadFusedModel, SaveFusedModel
from .gradient_fuse import GradientFuse
from .region_prompt import RegionPrompt, RegionPromptImport
from .regional_sampler import ApplyRegions, RegionalSampler

NODE_CLASS_MAPPINGS = {
    "MixOfShowEDLoRALoader": EDLoRALoader,
    "MixOfShowEDLoRATextEncode": EDLoRATextEncode,
    "MixOfShowEDLoRAConcept": EDLoRAConcept,
    "MixOfShowGradientFuse": GradientFuse,
    "MixOfShowSaveFusedModel": SaveFusedModel,
    "MixOfShowLoadFusedModel": LoadFusedModel,
    "MixOfShowRegionPrompt": RegionPrompt,
    "MixOfShowRegionPromptImport": RegionPromptImport,
    "MixOfShowApplyRegions": ApplyRegions,
    "MixOfShowRegionalSampler": RegionalSampler,
    "MixOfShowEDLoRATrain": EDLoRATrain,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MixOfShowEDLoRALoader": "EDLoRA Loader",
    "MixOfShowEDLoRATextEncode": "EDLoRA Text Encode",
    "MixOfShowEDLoRAConcept": "EDLoRA Concept",
    "MixOfShowGradientFuse": "Gradient Fuse",
    "MixOfShowSaveFusedModel": "Save Fused Model",
    "MixOfShowLoadFusedModel": "Load Fused Model",
    "MixOfShowRegionPrompt": "Region Prompt",
    "MixOfShowRegionPromptImport": "Region Prompt Import",
    "MixOfShowApplyRegions": "Apply Regions",
    "MixOfShowRegionalSampler": "Regional Sampler",
    "MixOfShowEDLoRATrain": "EDLoRA Train",
}
