"""Maps ED-LoRA module names (diffusers / HF) to ComfyUI state-dict keys and weights, and reads
which model family (mixofshow_core.families) a MODEL or CLIP belongs to."""
import comfy.utils

from ..mixofshow_core.families import FAMILIES, SD15, family_of_attn2_paths, family_of_encoders

ENCODER_NAMES = tuple(dict.fromkeys(e.name for f in FAMILIES.values() for e in f.encoders))


class ModelMismatchError(ValueError):
    """An ED-LoRA that does not fit the MODEL or CLIP it is applied to."""


def unet_weight_keys(model):
    """diffusers module path -> ComfyUI key ('diffusion_model.….weight') of this MODEL."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {k[:-len(".weight")]: "diffusion_model." + v for k, v in mapping.items() if k.endswith(".weight")}


def clip_weight_keys(clip, section="text_encoder"):
    """HF module path -> ComfyUI key ('clip_l.transformer.….weight') of the text encoder that an
    ED-LoRA file section ("text_encoder", SDXL's "text_encoder_2") patches in this CLIP."""
    family = clip_family(clip)
    encoder = next(e for e in family.encoders if e.file_section == section)
    return {path: f"{encoder.comfy_prefix}{path}.weight" for path in family.text_lora_layers(encoder)}


def weight_shapes(patcher):
    return {k: tuple(v.shape) for k, v in patcher.model.state_dict().items()}


def attn2_modules(model):
    return {name: m for name, m in model.model.diffusion_model.named_modules() if name.endswith(".attn2")}


def encoder_widths(clip):
    """{encoder name: token-embedding width} of the text encoders this CLIP holds."""
    return {name: getattr(clip.cond_stage_model, name).transformer.get_input_embeddings().weight.shape[1]
            for name in ENCODER_NAMES if hasattr(clip.cond_stage_model, name)}


def model_family(model):
    """The Family whose cross-attention blocks this MODEL has; ModelMismatchError if none."""
    modules = attn2_modules(model)
    width = next(iter(modules.values())).to_k.weight.shape[1] if modules else 0
    family = family_of_attn2_paths(modules, width)
    if family is None:
        raise ModelMismatchError(f"model: its {len(modules)} cross-attention layers on a {width}-wide context "
                                 f"match no supported model family ({', '.join(FAMILIES)})")
    return family


def clip_family(clip):
    """The Family whose text encoders this CLIP has; ModelMismatchError if none."""
    widths = encoder_widths(clip)
    family = family_of_encoders(widths)
    if family is None:
        found = ", ".join(f"{k} {v}" for k, v in widths.items()) or "none"
        raise ModelMismatchError(f"clip: text encoders ({found}) match no supported model family "
                                 f"({', '.join(FAMILIES)})")
    return family


def require_family(model=None, clip=None, what="ED-LoRA", family=None):
    """The one Family of MODEL and CLIP (both given ones must agree, and be `family` when given)."""
    found = {"model": model_family(model) if model is not None else None,
             "clip": clip_family(clip) if clip is not None else None}
    for input_name, got in found.items():
        if got is not None and family is not None and got is not family:
            raise ModelMismatchError(f"{input_name}: is {got.name}; {what} needs {family.name}")
    if found["model"] is not None and found["clip"] is not None and found["model"] is not found["clip"]:
        raise ModelMismatchError(f"clip: is {found['clip'].name} but the model is {found['model'].name}; "
                                 f"{what} needs a matching pair")
    return family or found["model"] or found["clip"]


def require_sd15(model=None, clip=None, what="ED-LoRA"):
    """Raises ModelMismatchError unless MODEL and CLIP are SD1.5 (16 cross-attention layers, 768-wide clip_l)."""
    return require_family(model, clip, what, SD15)
