"""ComfyUI's box types as regions: Region Prompt's bounding_box input (BOUNDING_BOX) and Regions from
Bounding Boxes (Create Bounding Boxes' elements).

The example values follow current ComfyUI's definitions (comfy_api/latest/_io.py BoundingBox:
{x, y, width, height} in pixels, a list of them, or one list per frame; comfy_extras/
nodes_bounding_boxes.py build_elements: {"type", "bbox": [ymin, xmin, ymax, xmax] on 0..1000,
"desc", "text" for text elements}); the expected normalized boxes are converted by hand."""
import nodes as comfy_nodes
import pytest
import torch

from comfyui_mixofshow.mixofshow_core.regions import Box, RegionError
from comfyui_mixofshow.nodes.region_prompt import RegionPrompt, RegionsFromBoundingBoxes
from comfyui_mixofshow.nodes.regional_sampler import ApplyRegions

from .sampling import denoise_once

WIDTH, HEIGHT = 512, 256


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def boxed_regions(clip, bounding_box, prompt="a knight", mask=None, width=WIDTH, height=HEIGHT, regions=()):
    return RegionPrompt().add_region(clip, prompt, "blurry", "0, 0, 1, 1", "normalized", width, height, 0.5,
                                     regions=regions, mask=mask, bounding_box=bounding_box)[0]


def boxed_region(clip, box_text, prompt="a knight", negative="blurry", units="normalized"):
    """The region Region Prompt makes from its own box string (the reference for the box inputs)."""
    return RegionPrompt().add_region(clip, prompt, negative, box_text, units, WIDTH, HEIGHT, 0.5)[0][0]


def element_regions(clip, elements, negative="blurry", regions=()):
    return RegionsFromBoundingBoxes().add_regions(clip, elements, negative, 0.5, regions=regions)[0]


def assert_same_encodings(region, reference):
    assert torch.equal(region.positive, reference.positive) and torch.equal(region.negative, reference.negative)
    assert region.adapter_weight == reference.adapter_weight


# ---------------------------------------------------------------- BOUNDING_BOX on Region Prompt

def test_one_pixel_box_is_the_same_region_as_the_pixel_box_string(clip):
    # x 128..384 of 512 -> 0.25..0.75; y 64..256 of 256 -> 0.25..1
    (region,) = boxed_regions(clip, {"x": 128, "y": 64, "width": 256, "height": 192})
    assert region.area == Box(0.25, 0.25, 0.75, 1.0) and region.frame == (WIDTH, HEIGHT)
    reference = boxed_region(clip, "128, 64, 384, 256", units="pixels")
    assert region.area == reference.area and region.frame == reference.frame
    assert_same_encodings(region, reference)


@pytest.mark.parametrize("shape", ["list", "frames"])
def test_several_boxes_add_one_region_each_with_the_prompt(clip, shape):
    boxes = [{"x": 0, "y": 0, "width": 128, "height": 256}, {"x": 256, "y": 128, "width": 256, "height": 128}]
    value = boxes if shape == "list" else [boxes]  # Create Bounding Boxes' bboxes output: one list per frame
    earlier = boxed_regions(clip, {"x": 0, "y": 0, "width": 512, "height": 256}, prompt="a field")
    regions = boxed_regions(clip, value, regions=earlier)
    assert [r.area for r in regions] == [Box(0, 0, 1, 1), Box(0, 0, 0.25, 1), Box(0.5, 0.5, 1, 1)]
    reference = boxed_region(clip, "0, 0, 1, 1")
    for region in regions[1:]:
        assert_same_encodings(region, reference)


def test_boxes_with_metadata_as_sent_by_core_nodes_are_accepted(clip):
    value = [[{"x": 0, "y": 0, "width": 256, "height": 256, "metadata": {"desc": "a knight", "type": "obj"}}]]
    (region,) = boxed_regions(clip, value)
    assert region.area == Box(0, 0, 0.5, 1)


@pytest.mark.parametrize("value, message", [
    ([[{"x": 0, "y": 0, "width": 8, "height": 8}], [{"x": 8, "y": 8, "width": 8, "height": 8}]],
     "bounding_box: holds boxes for 2 frames"),
    ([], "bounding_box: holds no box"),
    ([[]], "bounding_box: holds no box"),
    ({"x": 0, "y": 0, "width": 8}, "bounding_box: lacks height"),
    ({"x": 0, "y": 0, "width": 0, "height": 8}, "bounding_box: width and height must be positive"),
    ({"x": 400, "y": 0, "width": 200, "height": 8}, r"bounding_box: x 400..600, y 0..8 reaches beyond the 512x256"),
    ({"x": "0", "y": 0, "width": 8, "height": 8}, "bounding_box x: '0' is not a finite number"),
    ([{"x": 0, "y": 0, "width": 8, "height": 8}, "box"], "bounding_box box 2: expected a box"),
    ("0, 0, 8, 8", "bounding_box: expected a box {x, y, width, height} or a list of them, got str"),
])
def test_malformed_bounding_boxes_name_the_input(clip, value, message):
    with pytest.raises(RegionError, match=message):
        boxed_regions(clip, value)


def test_mask_and_bounding_box_together_are_refused(clip):
    with pytest.raises(RegionError, match="bounding_box: connect either a mask or bounding boxes, not both"):
        boxed_regions(clip, {"x": 0, "y": 0, "width": 8, "height": 8}, mask=torch.ones(HEIGHT, WIDTH))


# ---------------------------------------------------------------- Create Bounding Boxes' elements

ELEMENTS = [  # as build_elements writes them: background first, boxes on the 0..1000 grid
    {"type": "obj", "bbox": [0, 0, 1000, 1000], "desc": "a castle on a hill", "color_palette": ["#334455"]},
    {"type": "obj", "bbox": [250, 100, 1000, 500], "desc": "a knight"},
    {"type": "text", "bbox": [0, 500, 125, 1000], "text": "HELLO", "desc": "a red banner"},
]
# by hand: [ymin, xmin, ymax, xmax] / 1000 -> Box(x1=xmin, y1=ymin, x2=xmax, y2=ymax)
EXPECTED_BOXES = [Box(0, 0, 1, 1), Box(0.1, 0.25, 0.5, 1), Box(0.5, 0, 1, 0.125)]


def test_each_element_is_a_region_with_its_description_as_prompt(clip):
    earlier = boxed_regions(clip, {"x": 0, "y": 0, "width": 512, "height": 256}, prompt="a field")
    regions = element_regions(clip, ELEMENTS, regions=earlier)
    assert regions[0] is earlier[0]
    assert [r.area for r in regions[1:]] == EXPECTED_BOXES
    for region, element, box in zip(regions[1:], ELEMENTS, EXPECTED_BOXES):
        reference = boxed_region(clip, f"{box.x1}, {box.y1}, {box.x2}, {box.y2}", prompt=element["desc"])
        assert region.area == reference.area and region.frame is None
        assert_same_encodings(region, reference)


def test_element_boxes_listed_bottom_up_are_read_as_core_reads_them(clip):
    (region,) = element_regions(clip, [{"type": "obj", "bbox": [1000, 500, 250, 100], "desc": "a knight"}])
    assert region.area == Box(0.1, 0.25, 0.5, 1)


def test_element_regions_chain_into_apply_regions(model, clip):
    positive, negative = encode(clip, "a castle on a hill"), encode(clip, "blurry")
    regions = element_regions(clip, ELEMENTS[1:])
    patched, region_positive, region_negative = ApplyRegions().apply(model, positive, negative, regions)
    _, denoised, _ = denoise_once(patched, region_positive, region_negative, 1.0)
    assert torch.isfinite(denoised).all()


@pytest.mark.parametrize("elements, message", [
    ([], "elements: holds no element"),
    ({"bbox": [0, 0, 10, 10], "desc": "x"}, "elements: expected Create Bounding Boxes' elements"),
    (["a knight"], "elements item 1: expected an element"),
    ([{"bbox": [0, 0, 10], "desc": "x"}], r"elements item 1: needs 'bbox' \[ymin, xmin, ymax, xmax\]"),
    ([ELEMENTS[1], {"bbox": [0, 0, 10, 1200], "desc": "x"}], r"elements item 2: bbox \[0, 0, 10, 1200\] must lie"),
    ([{"bbox": [0, 10, 500, 10], "desc": "x"}], "elements item 1: bbox .* encloses no area"),
    ([{"bbox": [0, "a", 500, 10], "desc": "x"}], "elements item 1 bbox: 'a' is not a finite number"),
    ([{"type": "text", "bbox": [0, 0, 500, 500], "text": "HELLO", "desc": " "}], "elements item 1: has no description"),
])
def test_malformed_elements_name_the_input(clip, elements, message):
    with pytest.raises(RegionError, match=message):
        element_regions(clip, elements)


def test_unknown_concept_word_in_an_element_names_the_element(clip):
    with pytest.raises(RegionError, match="elements item 1 prompt"):
        element_regions(clip, [{"bbox": [0, 0, 500, 500], "desc": "a <nobody1>"}])
