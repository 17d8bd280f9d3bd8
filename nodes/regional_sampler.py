"""Apply Regions and Regional Sampler: Mix-of-Show regionally controllable sampling."""
import comfy.samplers
import nodes as comfy_nodes

from ..mixofshow_core.regions import RegionError, check_region_count, check_region_tokens
from .layerwise import CONTEXT_KEY, SELECTORS, install_routing, is_uniform
from .model_keys import require_family
from .region_prompt import REGIONS_TYPE
from .regional_attention import REGIONS_KEY, RegionContexts, RegionLayout, install_regional_attention


def is_routed(model, family):
    """Whether MODEL routes layer-wise contexts (it came through an ED-LoRA node)."""
    patches = model.model_options["transformer_options"].get("patches", {}).get("attn2_patch", [])
    return SELECTORS[family.name] in patches


def check_concepts_routable(model, family, regions, positive, negative):
    """Concept words need the ED-LoRA UNet that goes with the CLIP that encoded them."""
    if is_routed(model, family):
        return
    for number, region in enumerate(regions, start=1):
        if region.concept_words:
            raise RegionError(
                f"region {number}: uses concept words {', '.join(region.concept_words)} but the MODEL has no "
                f"ED-LoRA; connect the MODEL from the 'EDLoRA Loader' whose CLIP encoded the regions")
    for label, conditioning in (("positive", positive), ("negative", negative)):
        for _, options in conditioning:
            stack = options.get("model_conds", {}).get(CONTEXT_KEY)
            if stack is not None and not is_uniform(stack.cond):
                raise RegionError(f"{label}: uses concept words but the MODEL has no ED-LoRA; connect the MODEL "
                                  f"from the 'EDLoRA Loader' whose CLIP encoded it")


def region_encodings(stacks, family, label):
    """The per-region [1, L, T_r, D] encodings, checked against the model's family, each kept at its
    own token count; one whose layers are all equal (a prompt without concept words) is kept as
    [1, 1, T_r, D]."""
    layers, width = family.num_cross_attn_layers, family.context_dim
    for number, stack in enumerate(stacks, start=1):
        if stack.dim() != 4 or stack.shape[0] != 1 or stack.shape[1] != layers or stack.shape[-1] != width:
            raise RegionError(f"region {number}: {label} encoding has shape {list(stack.shape)}, expected "
                              f"[1, {layers}, tokens, {width}]; encode regions with the CLIP that goes with the model")
    check_region_tokens([stack.shape[2] for stack in stacks], label)
    return [stack[:, :1] if is_uniform(stack) else stack for stack in stacks]


def attach_regions(conditioning, contexts, layout, label):
    """Copies of the conditioning entries whose model_conds carry the region data."""
    out = []
    for number, (cond, options) in enumerate(conditioning, start=1):
        if "area" in options or options.get("set_area_to_bounds"):
            raise RegionError(f"{label}: entry {number} is restricted to an area (ConditioningSetArea or a mask "
                              f"set to its bounds); regional sampling needs conditioning over the whole latent")
        model_conds = {**options.get("model_conds", {}), REGIONS_KEY: RegionContexts(contexts, layout)}
        out.append([cond, {**options, "model_conds": model_conds}])
    return out


def region_layout(regions, family):
    return RegionLayout([r.area for r in regions], [r.frame for r in regions], [r.adapter_weight for r in regions],
                        family)


def apply_regions(model, positive, negative, regions):
    """(MODEL clone with regional attention, positive, negative with the region data attached).

    No regions: the inputs unchanged."""
    if not regions:
        return model, positive, negative
    family = require_family(model=model, what="Regional sampling")
    check_region_count(len(regions))
    check_concepts_routable(model, family, regions, positive, negative)
    layout = region_layout(regions, family)
    region_positive = region_encodings([r.positive for r in regions], family, "prompt")
    region_negative = region_encodings([r.negative for r in regions], family, "negative prompt")
    patched = install_regional_attention(install_routing(model.clone()), family)
    return (patched, attach_regions(positive, region_positive, layout, "positive"),
            attach_regions(negative, region_negative, layout, "negative"))


MODEL_TOOLTIPS = {
    "model": ("MODEL", {"tooltip": "The model (from 'EDLoRA Loader' or fusion when regions use concept words)."}),
    "positive": ("CONDITIONING", {"tooltip": "Global prompt: used outside every region."}),
    "negative": ("CONDITIONING", {"tooltip": "Global negative prompt: used outside every region by the "
                                             "unconditional branch."}),
    "regions": (REGIONS_TYPE, {"tooltip": "Regions from 'Region Prompt' / 'Region Prompt Import'."}),
}


class ApplyRegions:
    DESCRIPTION = ("Installs Mix-of-Show region-aware cross-attention so any sampler (KSampler, KSamplerAdvanced, "
                   "SamplerCustom) draws each region's prompt inside its box or mask: in every cross-attention layer "
                   "the output inside a region is replaced by attention to that region's prompt (its negative for "
                   "the unconditional branch), overlapping regions are averaged and soft masks weight the region "
                   "against the global output. ControlNet / T2I-Adapter residuals are scaled by each region's "
                   "adapter weight inside it. Use the returned model and conditioning together.")
    CATEGORY = "mixofshow/regions"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    OUTPUT_TOOLTIPS = ("The model with regional attention installed.",
                       "The positive conditioning carrying the region prompts.",
                       "The negative conditioning carrying the region negative prompts.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(MODEL_TOOLTIPS)}

    def apply(self, model, positive, negative, regions):
        return apply_regions(model, positive, negative, regions)


class RegionalSampler:
    DESCRIPTION = ("Samples a Mix-of-Show regional image: 'Apply Regions' followed by a KSampler with the same "
                   "settings.")
    CATEGORY = "mixofshow/regions"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **MODEL_TOOLTIPS,
            "latent_image": ("LATENT", {"tooltip": "The latent to denoise (its size must fit the regions' image)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip": "Noise seed."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (the original uses 7.5)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampling algorithm (the original uses "
                                                                           "DPM-Solver multistep: dpmpp_2m)."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Noise schedule."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "How much of the latent to replace; 1 for text-to-image."}),
        }}

    def sample(self, model, positive, negative, regions, latent_image, seed, steps, cfg, sampler_name, scheduler,
               denoise):
        if regions:
            family = require_family(model=model, what="Regional sampling")
            region_layout(regions, family).check_latent(tuple(int(s) for s in latent_image["samples"].shape[2:]))
        model, positive, negative = apply_regions(model, positive, negative, regions)
        return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                           latent_image, denoise=denoise)
