"""ComfyUI's own box values as region boxes, in the formats current ComfyUI defines them.

BOUNDING_BOX (comfy_api/latest/_io.py BoundingBox): {"x", "y", "width", "height"} in pixels, a list
of such boxes, or one list per frame (what Create Bounding Boxes' `bboxes` output sends).
Create Bounding Boxes' `elements` (comfy_extras/nodes_bounding_boxes.py, type ARRAY): a list of
{"type": "obj" | "text", "bbox": [ymin, xmin, ymax, xmax] on a 0..1000 grid, "desc": ..., ...}.
Both become normalized Boxes; every malformed value is a RegionError naming the input.
"""
import math

from ..mixofshow_core.regions import Box, RegionError, check_region_count

BOX_KEYS = ("x", "y", "width", "height")
ELEMENT_GRID = 1000


def _number(value, label):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegionError(f"{label}: {value!r} is not a finite number")
    return float(value)


def _frame_boxes(value, label):
    """The boxes of a BOUNDING_BOX value: a box, a list of boxes, or a single frame's list."""
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise RegionError(f"{label}: expected a box {{x, y, width, height}} or a list of them, "
                          f"got {type(value).__name__}")
    if value and all(isinstance(frame, (list, tuple)) for frame in value):
        if len(value) != 1:
            raise RegionError(f"{label}: holds boxes for {len(value)} frames; a region lies on one image, "
                              f"connect one frame's boxes")
        value = value[0]
    if not value:
        raise RegionError(f"{label}: holds no box; draw at least one")
    check_region_count(len(value), label)
    return list(value)


def _pixel_box(box, width, height, label):
    if not isinstance(box, dict):
        raise RegionError(f"{label}: expected a box {{x, y, width, height}}, got {type(box).__name__}")
    missing = [key for key in BOX_KEYS if key not in box]
    if missing:
        raise RegionError(f"{label}: lacks {', '.join(missing)}; a box is {{x, y, width, height}} in pixels")
    x, y, w, h = (_number(box[key], f"{label} {key}") for key in BOX_KEYS)
    if w <= 0 or h <= 0:
        raise RegionError(f"{label}: width and height must be positive, got {w:g}x{h:g}")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise RegionError(f"{label}: x {x:g}..{x + w:g}, y {y:g}..{y + h:g} reaches beyond the {width}x{height} "
                          f"image; set width and height to the size the boxes were drawn on")
    return Box(x / width, y / height, (x + w) / width, (y + h) / height)


def pixel_boxes(value, width, height, label="bounding_box"):
    """Normalized Boxes of a BOUNDING_BOX value laid out on a width x height image."""
    boxes = _frame_boxes(value, label)
    return [_pixel_box(box, width, height, f"{label} box {number}" if len(boxes) > 1 else label)
            for number, box in enumerate(boxes, start=1)]


def _element(element, label):
    """(description, Box) of one element; the grid box may list its edges in either order, as
    ComfyUI's own reader allows."""
    if not isinstance(element, dict):
        raise RegionError(f"{label}: expected an element {{bbox, desc}}, got {type(element).__name__}")
    grid_box = element.get("bbox")
    if not isinstance(grid_box, (list, tuple)) or len(grid_box) != 4:
        raise RegionError(f"{label}: needs 'bbox' [ymin, xmin, ymax, xmax] on the 0..{ELEMENT_GRID} grid, "
                          f"got {grid_box!r}")
    ymin, xmin, ymax, xmax = (_number(v, f"{label} bbox") for v in grid_box)
    for value in (ymin, xmin, ymax, xmax):
        if not 0 <= value <= ELEMENT_GRID:
            raise RegionError(f"{label}: bbox {list(grid_box)} must lie within 0..{ELEMENT_GRID}")
    if ymin == ymax or xmin == xmax:
        raise RegionError(f"{label}: bbox {list(grid_box)} encloses no area")
    description = element.get("desc")
    if not isinstance(description, str) or not description.strip():
        raise RegionError(f"{label}: has no description ('desc'); describe what belongs in its box")
    return description.strip(), Box(min(xmin, xmax) / ELEMENT_GRID, min(ymin, ymax) / ELEMENT_GRID,
                                    max(xmin, xmax) / ELEMENT_GRID, max(ymin, ymax) / ELEMENT_GRID)


def element_boxes(elements, label="elements"):
    """[(description, normalized Box)] of Create Bounding Boxes' elements, in their order."""
    if not isinstance(elements, (list, tuple)):
        raise RegionError(f"{label}: expected Create Bounding Boxes' elements (a list), got {type(elements).__name__}")
    if not elements:
        raise RegionError(f"{label}: holds no element; draw boxes in Create Bounding Boxes")
    check_region_count(len(elements), label)
    return [_element(element, f"{label} item {number}") for number, element in enumerate(elements, start=1)]
