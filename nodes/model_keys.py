"""Maps ED-LoRA module names (diffusers / HF) to ComfyUI state-dict keys and weights."""
import comfy.utils

from ..mixofshow_core import sd15


class ModelMismatchError(ValueError):
    """An ED-LoRA that does not fit the MODEL or CLIP it is applied to."""


def unet_weight_keys(model):
    """diffusers module path -> ComfyUI key ('diffusion_model.….weight') of this MODEL."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {k[:-len(".weight")]: "diffusion_model." + v for k, v in mapping.items() if k.endswith(".weight")}


def clip_weight_keys(clip):
    """HF module path -> ComfyUI key ('clip_l.transformer.….weight') of this CLIP."""
    return {path: f"clip_l.transformer.{path}.weight" for path in sd15.text_lora_layers()}


def weight_shapes(patcher):
    return {k: tuple(v.shape) for k, v in patcher.model.state_dict().items()}


def count_cross_attention_layers(model):
    return sum(1 for name, _ in model.model.diffusion_model.named_modules() if name.endswith(".attn2"))


def clip_text_dim(clip):
    return clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]


def require_sd15(model=None, clip=None, what="ED-LoRA"):
    """Raises ModelMismatchError unless MODEL has 16 cross-attention layers and CLIP is 768-wide clip_l."""
    if model is not None:
        layers = count_cross_attention_layers(model)
        if layers != sd15.NUM_CROSS_ATTN_LAYERS:
            raise ModelMismatchError(f"model: has {layers} cross-attention layers; {what} needs an SD1.5 "
                                     f"model ({sd15.NUM_CROSS_ATTN_LAYERS})")
    if clip is not None:
        if not hasattr(clip.cond_stage_model, "clip_l") or hasattr(clip.cond_stage_model, "clip_g"):
            raise ModelMismatchError(f"clip: {what} needs an SD1.5 CLIP (clip_l only)")
        dim = clip_text_dim(clip)
        if dim != sd15.TEXT_DIM:
            raise ModelMismatchError(f"clip: text width {dim}; {what} needs SD1.5's {sd15.TEXT_DIM}")
