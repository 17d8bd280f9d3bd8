"""EDLoRA Loader: applies one ED-LoRA to clones of MODEL and CLIP."""
import comfy.lora
import folder_paths
import torch

from ..mixofshow_core.edlora_format import load_edlora
from .concepts import concepts_of, set_concepts
from .layerwise import install_routing
from .model_keys import ModelMismatchError, clip_weight_keys, require_family, unet_weight_keys, weight_shapes
from .paths import EDLORA_FOLDER, file_fingerprint


def lora_patches(layers, key_map, shapes, source, part):
    """ComfyUI patches for {module path: LoRALayer}; each layer must fit this model's weight."""
    lora_sd, to_load = {}, {}
    for index, (path, layer) in enumerate(layers.items()):
        key = key_map.get(path)
        if key is None or key not in shapes:
            raise ModelMismatchError(f"{source}: {part} layer {path} does not exist in this model")
        if tuple(layer.weight_shape[:2]) != shapes[key][:2] or len(layer.weight_shape) != len(shapes[key]):
            raise ModelMismatchError(
                f"{source}: {part} layer {path} is {list(layer.weight_shape)} in the file but "
                f"{list(shapes[key])} in the model; the ED-LoRA was made for another base model")
        name = f"edlora.{part}.{index}"
        lora_sd[name + ".lora_up.weight"] = layer.up
        lora_sd[name + ".lora_down.weight"] = layer.down
        lora_sd[name + ".alpha"] = torch.tensor(float(layer.rank * layer.scale))  # host scale alpha/rank = layer.scale
        to_load[name] = key
    return comfy.lora.load_lora(lora_sd, to_load)


def require_edlora_family(edlora, family):
    """Raises ModelMismatchError naming the file unless it was made for `family`."""
    if edlora.family != family.name:
        raise ModelMismatchError(f"{edlora.name}: an ED-LoRA for {edlora.family} models cannot be applied to "
                                 f"this {family.name} model")


def apply_edlora(model, clip, edlora, unet_alpha, text_encoder_alpha):
    """(MODEL, CLIP) clones with the ED-LoRA patched in and its words registered on the CLIP.

    ΔW = α·up@down (no rank division), applied as patches so cached checkpoints stay clean;
    on SDXL the text LoRAs go to clip_l (text_encoder) and clip_g (text_encoder_2)."""
    family = require_family(model, clip)
    require_edlora_family(edlora, family)
    concepts = concepts_of(clip).with_embeddings(edlora.layer_embeddings(), edlora.name, family)
    unet_patches = lora_patches(edlora.unet, unet_weight_keys(model), weight_shapes(model),
                                edlora.name, "unet")
    text_patches = {}
    for section, layers in edlora.text_parts().items():
        text_patches.update(lora_patches(layers, clip_weight_keys(clip, section), weight_shapes(clip.patcher),
                                         edlora.name, section))
    patched_model = install_routing(model.clone())
    patched_model.add_patches(unet_patches, unet_alpha)
    patched_clip = clip.clone()
    patched_clip.add_patches(text_patches, text_encoder_alpha)
    set_concepts(patched_clip, concepts)
    return patched_model, patched_clip


class EDLoRALoader:
    DESCRIPTION = ("Loads a Mix-of-Show ED-LoRA (.safetensors, or an original .pth) from models/edlora: "
                   "its text-encoder and UNet LoRAs are patched into MODEL and CLIP, and its concept words "
                   "become usable in 'EDLoRA Text Encode'. Chaining loaders adds their LoRA deltas (a plain "
                   "weight sum, which blurs identities); use gradient fusion to combine concepts well.")
    CATEGORY = "mixofshow"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model with the ED-LoRA applied and layer-wise routing installed.",
                       "The CLIP with the text-encoder LoRA applied and the concept words registered.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model (the family the ED-LoRA was made for)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP that goes with the model."}),
            "edlora_name": (folder_paths.get_filename_list(EDLORA_FOLDER),
                            {"tooltip": "ED-LoRA file in models/edlora (.safetensors or original .pth)."}),
            "unet_alpha": ("FLOAT", {"default": 0.7, "min": -5.0, "max": 5.0, "step": 0.05,
                                     "tooltip": "Scale of the UNet LoRA: ΔW = α·up·down (no division by rank)."}),
            "text_encoder_alpha": ("FLOAT", {"default": 0.7, "min": -5.0, "max": 5.0, "step": 0.05,
                                             "tooltip": "Scale of the text-encoder LoRA."}),
        }}

    @classmethod
    def IS_CHANGED(cls, edlora_name, **kwargs):
        return file_fingerprint(folder_paths.get_full_path(EDLORA_FOLDER, edlora_name))

    def load(self, model, clip, edlora_name, unet_alpha, text_encoder_alpha):
        path = folder_paths.get_full_path(EDLORA_FOLDER, edlora_name)
        if path is None:
            raise FileNotFoundError(f"edlora_name: {edlora_name} is not in models/{EDLORA_FOLDER}")
        edlora = load_edlora(path)
        return apply_edlora(model, clip, edlora, unet_alpha, text_encoder_alpha)

