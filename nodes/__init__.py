"""ComfyUI adapters for mixofshow_core: one capability per module."""
from .edlora_concept import EDLoRAConcept
from .edlora_loader import EDLoRALoader
from .edlora_text_encode import EDLoRATextEncode
from .edlora_train import EDLoRATrain
from .export_edlora import ExportEDLoRA
from .fused_model import LoadFusedModel, SaveFusedModel
from .gradient_fuse import GradientFuse
from .lora_concept import LoRAConceptNode
from .region_prompt import RegionPrompt, RegionPromptImport, RegionsFromBoundingBoxes
from .regional_sampler import ApplyRegions, RegionalSampler

# node id (stable: saved workflows refer to it), V1 class (the one declaration), display name
NODES = (
    ("MixOfShowEDLoRALoader", EDLoRALoader, "EDLoRA Loader"),
    ("MixOfShowEDLoRATextEncode", EDLoRATextEncode, "EDLoRA Text Encode"),
    ("MixOfShowEDLoRAConcept", EDLoRAConcept, "EDLoRA Concept"),
    ("MixOfShowLoRAConcept", LoRAConceptNode, "LoRA Concept"),
    ("MixOfShowGradientFuse", GradientFuse, "Gradient Fuse"),
    ("MixOfShowSaveFusedModel", SaveFusedModel, "Save Fused Model"),
    ("MixOfShowLoadFusedModel", LoadFusedModel, "Load Fused Model"),
    ("MixOfShowRegionPrompt", RegionPrompt, "Region Prompt"),
    ("MixOfShowRegionPromptImport", RegionPromptImport, "Region Prompt Import"),
    ("MixOfShowRegionsFromBoundingBoxes", RegionsFromBoundingBoxes, "Regions from Bounding Boxes"),
    ("MixOfShowApplyRegions", ApplyRegions, "Apply Regions"),
    ("MixOfShowRegionalSampler", RegionalSampler, "Regional Sampler"),
    ("MixOfShowEDLoRATrain", EDLoRATrain, "EDLoRA Train"),
    ("MixOfShowExportEDLoRA", ExportEDLoRA, "Export ED-LoRA"),
)
NODE_CLASS_MAPPINGS = {node_id: v1 for node_id, v1, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: display_name for node_id, _, display_name in NODES}
