"""Region Prompt, Region Prompt Import and Regions from Bounding Boxes: build the REGIONS list of
regional sampling."""
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..mixofshow_core.prompt_binding import concept_words_in
from ..mixofshow_core.regions import UNITS, RegionError, parse_box, parse_prompt_rewrite
from .bounding_boxes import element_boxes, pixel_boxes
from .edlora_text_encode import encode_layerwise
from .layerwise import CONTEXT_KEY
from .model_keys import clip_family

REGIONS_TYPE = "REGIONS"
MAX_IMAGE_SIZE = 16384


@dataclass(frozen=True, eq=False)
class Region:
    """One region: layer-wise encodings [1, L, T, D] of its prompt and negative prompt, its area
    (a normalized Box or a float mask [H, W]), the (width, height) the area was laid out on
    (None for normalized boxes) and the factor on control residuals inside it."""
    positive: torch.Tensor
    negative: torch.Tensor
    area: object
    frame: Optional[tuple]
    adapter_weight: float
    concept_words: tuple


def layerwise_stack(clip, text, label):
    """[1, L, T, D] layer-wise encoding of `text` (L: the CLIP family's cross-attention layers);
    errors name the input `label`."""
    try:
        cond, options = encode_layerwise(clip, text)[0]
    except ValueError as error:
        raise RegionError(f"{label}: {str(error).removeprefix('text: ')}") from error
    stack = options.get("model_conds", {}).get(CONTEXT_KEY)
    if stack is not None:
        return stack.cond
    return cond.unsqueeze(1).expand(-1, clip_family(clip).num_cross_attn_layers, -1, -1)


def encode_region(clip, prompt, negative_prompt, area, frame, adapter_weight, label=""):
    if not prompt.strip():
        raise RegionError(f"{label}prompt: is empty; describe what belongs in the region")
    return Region(positive=layerwise_stack(clip, prompt, f"{label}prompt"),
                  negative=layerwise_stack(clip, negative_prompt, f"{label}negative_prompt"),
                  area=area, frame=frame, adapter_weight=float(adapter_weight),
                  concept_words=tuple(concept_words_in(prompt + " " + negative_prompt)))


def mask_area(mask, width, height):
    """A ComfyUI MASK ([1, H, W] or [H, W], values 0..1) as a float [H, W] region area."""
    mask = torch.as_tensor(mask).to(torch.float32).cpu()
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            raise RegionError(f"mask: holds {mask.shape[0]} masks; connect a single mask")
        mask = mask[0]
    if mask.dim() != 2:
        raise RegionError(f"mask: expected a [H, W] mask, got shape {list(mask.shape)}")
    if tuple(mask.shape) != (height, width):
        raise RegionError(f"mask: is {mask.shape[1]}x{mask.shape[0]} but width x height is {width}x{height}; "
                          f"draw the mask at the image size")
    if torch.isnan(mask).any() or mask.min() < 0 or mask.max() > 1:
        raise RegionError("mask: values must lie in 0..1")
    if not mask.any():
        raise RegionError("mask: is empty (all zero)")
    return mask.clone()


def _image_size_inputs(purpose):
    return {
        "width": ("INT", {"default": 512, "min": 1, "max": MAX_IMAGE_SIZE,
                          "tooltip": f"Width in pixels of the image {purpose}."}),
        "height": ("INT", {"default": 512, "min": 1, "max": MAX_IMAGE_SIZE,
                           "tooltip": f"Height in pixels of the image {purpose}."}),
    }


ADAPTER_WEIGHT_INPUT = ("FLOAT", {
    "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
    "tooltip": "Factor on ControlNet / T2I-Adapter residuals inside the region (the original's "
               "region_keypose_adaptor_weight, relative to the Apply ControlNet strength); 1 leaves them as they are."})
REGIONS_INPUT = (REGIONS_TYPE, {"tooltip": "Regions to add this one to (chain Region Prompt nodes)."})


class RegionPrompt:
    DESCRIPTION = ("One region of a Mix-of-Show regional image: a prompt and negative prompt that apply inside a box "
                   "or mask. Both are encoded once per cross-attention layer like 'EDLoRA Text Encode', so concept "
                   "words such as '<potter1> <potter2>' work. Chain nodes to add regions; feed the list to "
                   "'Apply Regions' or 'Regional Sampler'.")
    CATEGORY = "mixofshow/regions"
    RETURN_TYPES = (REGIONS_TYPE,)
    OUTPUT_TOOLTIPS = ("The incoming regions plus this one.",)
    FUNCTION = "add_region"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP that goes with the model (from 'EDLoRA Loader' for concept words)."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                      "tooltip": "What belongs inside the region, e.g. 'a <potter1> <potter2>, standing'."}),
                "negative_prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                               "tooltip": "Negative prompt used inside the region by the unconditional "
                                                          "branch (may be empty)."}),
                "box": ("STRING", {"default": "0, 0, 1, 1",
                                   "tooltip": "x1, y1, x2, y2: left, top, right, bottom edges, in the chosen units. "
                                              "Ignored when a mask or bounding boxes are connected."}),
                "units": (list(UNITS), {"tooltip": "normalized: box values 0..1 of the image; pixels: values within "
                                                   "width x height."}),
                **_image_size_inputs("the box or mask is laid out on (the image you sample at or its pose image)"),
                "adapter_weight": ADAPTER_WEIGHT_INPUT,
            },
            "optional": {
                "regions": REGIONS_INPUT,
                "mask": ("MASK", {"tooltip": "Region as a mask of width x height instead of the box; soft values "
                                             "weight the region's output against the global one."}),
                "bounding_box": ("BOUNDING_BOX", {
                    "forceInput": True,
                    "tooltip": "Region as ComfyUI bounding boxes in pixels of width x height instead of the box, "
                               "e.g. Create Bounding Boxes' bboxes; several boxes add one region each, all with "
                               "this prompt."}),
            },
        }

    def add_region(self, clip, prompt, negative_prompt, box, units, width, height, adapter_weight,
                   regions=(), mask=None, bounding_box=None):
        if bounding_box is not None:
            if mask is not None:
                raise RegionError("bounding_box: connect either a mask or bounding boxes, not both")
            areas, frame = pixel_boxes(bounding_box, width, height), (width, height)
        elif mask is not None:
            areas, frame = [mask_area(mask, width, height)], (width, height)
        else:
            areas = [parse_box(box, units, width, height, label="box")]
            frame = (width, height) if units == "pixels" else None
        region = encode_region(clip, prompt, negative_prompt, areas[0], frame, adapter_weight)
        return (tuple(regions) + tuple(replace(region, area=area) for area in areas),)


class RegionPromptImport:
    DESCRIPTION = ("Imports the regions of the original Mix-of-Show's --prompt_rewrite string, "
                   "'[prompt]-*-[negative]-*-[y1, x1, y2, x2]|...', with boxes in pixels of the condition image, "
                   "row first ('[]' is the whole image). The string is parsed, never evaluated.")
    CATEGORY = "mixofshow/regions"
    RETURN_TYPES = (REGIONS_TYPE,)
    OUTPUT_TOOLTIPS = ("The incoming regions plus the imported ones, in order.",)
    FUNCTION = "import_regions"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP that goes with the model (from 'EDLoRA Loader' for concept words)."}),
                "prompt_rewrite": ("STRING", {"multiline": True,
                                              "tooltip": "The original's region string, e.g. '[a <hina1> <hina2>, near "
                                                         "a lake]-*-[crop, lowres]-*-[4, 28, 512, 251]|...'."}),
                **_image_size_inputs("the boxes refer to (the pose/sketch condition image)"),
                "adapter_weight": ADAPTER_WEIGHT_INPUT,
            },
            "optional": {"regions": REGIONS_INPUT},
        }

    def import_regions(self, clip, prompt_rewrite, width, height, adapter_weight, regions=()):
        imported = tuple(
            encode_region(clip, spec.prompt, spec.negative, spec.box, (width, height), adapter_weight,
                          label=f"prompt_rewrite entry {number} ")
            for number, spec in enumerate(parse_prompt_rewrite(prompt_rewrite, width, height), start=1))
        return (tuple(regions) + imported,)



class RegionsFromBoundingBoxes:
    DESCRIPTION = ("One region per element of ComfyUI's 'Create Bounding Boxes' node: the element's box, with its "
                   "description as the prompt (concept words such as '<potter1> <potter2>' work there). Feed the "
                   "list to 'Apply Regions' or 'Regional Sampler', or chain more region nodes.")
    CATEGORY = "mixofshow/regions"
    RETURN_TYPES = (REGIONS_TYPE,)
    OUTPUT_TOOLTIPS = ("The incoming regions plus one per element, in the elements' order.",)
    FUNCTION = "add_regions"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP that goes with the model (from 'EDLoRA Loader' for concept words)."}),
                "elements": ("ARRAY", {"tooltip": "Create Bounding Boxes' elements: each a box on a 0..1000 grid "
                                                  "[ymin, xmin, ymax, xmax] and a description."}),
                "negative_prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                               "tooltip": "Negative prompt used inside every one of these regions "
                                                          "(may be empty)."}),
                "adapter_weight": ADAPTER_WEIGHT_INPUT,
            },
            "optional": {"regions": REGIONS_INPUT},
        }

    def add_regions(self, clip, elements, negative_prompt, adapter_weight, regions=()):
        added = tuple(
            encode_region(clip, description, negative_prompt, box, None, adapter_weight,
                          label=f"elements item {number} ")
            for number, (description, box) in enumerate(element_boxes(elements), start=1))
        return (tuple(regions) + added,)
