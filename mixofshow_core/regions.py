"""Region math for Mix-of-Show regionally controllable sampling.

Boxes are stored normalized to [0, 1] as (x1, y1, x2, y2), column-first. The original's
strings (`prompt_rewrite`, `region_*_adaptor_weight`) are row-first pixels [y1, x1, y2, x2];
their importers convert. Everything is parsed with float(), never evaluated.

Messages number regions and entries from 1.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .messages import excerpt

UNITS = ("normalized", "pixels")

# Caps on what one regional sampling may hold, far above what the original's examples use
# (2-4 regions of one chunk each); they bound the memory of the region encodings.
MAX_REGIONS = 32
MAX_REGION_CHUNKS = 128  # chunks of 77 tokens over all region prompts (and, apart, all region negatives)
CHUNK_TOKENS = 77

# Box edges closer than this to a cell border snap to it, so 0.28 * 50 = 14.000000000000002
# starts at row 14 as intended instead of row 15.
_GRID_EPS = 1e-6


class RegionError(ValueError):
    """A region input is malformed; the message names the input."""


@dataclass(frozen=True)
class Box:
    """Normalized box: 0 <= x1 < x2 <= 1 across the width, 0 <= y1 < y2 <= 1 down the height."""
    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def full(cls):
        return cls(0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class RegionSpec:
    """One region of the original's `prompt_rewrite`: its prompt, negative prompt and box."""
    prompt: str
    negative: str
    box: Box


# ---------------------------------------------------------------- caps

def check_region_count(count, label="regions"):
    if count > MAX_REGIONS:
        raise RegionError(f"{label}: {count} regions, more than the {MAX_REGIONS} one regional sampling may hold; "
                          f"merge regions or sample in parts")


def check_region_tokens(token_counts, label):
    """Refuses region encodings whose token counts (one per region) add up to more than
    MAX_REGION_CHUNKS chunks."""
    chunks = sum(-(-int(t) // CHUNK_TOKENS) for t in token_counts)
    if chunks > MAX_REGION_CHUNKS:
        raise RegionError(f"regions: the region {label}s hold {chunks} chunks of {CHUNK_TOKENS} tokens in all, more "
                          f"than {MAX_REGION_CHUNKS}; shorten them or use fewer regions")


# ---------------------------------------------------------------- parsing

def _parse_numbers(text, label):
    body = str(text).strip()
    if body[:1] in "[(" and body[-1:] in "])":
        body = body[1:-1].strip()
    if not body:
        return []
    parts = body.split(",") if "," in body else body.split()
    values = []
    for part in parts:
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise RegionError(f"{label}: {excerpt(part)} is not a number (in {excerpt(text)})") from None
        if not math.isfinite(value):
            raise RegionError(f"{label}: {excerpt(part)} is not a finite number (in {excerpt(text)})")
        values.append(value)
    return values


def _check_image_size(width, height, label):
    if width is None or height is None:
        raise RegionError(f"{label}: pixel units need image_width and image_height")
    if not (width > 0 and height > 0):
        raise RegionError(f"{label}: image size {width}x{height} must be positive")


def _box_in_frame(x1, y1, x2, y2, width, height, unit, label):
    """Check a box given in a width x height frame and normalize it."""
    for name, value, limit in (("x1", x1, width), ("y1", y1, height), ("x2", x2, width), ("y2", y2, height)):
        if not 0 <= value <= limit:
            raise RegionError(f"{label}: {name} ({value:g}) must be within 0..{limit:g} {unit}")
    if x2 <= x1:
        raise RegionError(f"{label}: x2 ({x2:g}) must be greater than x1 ({x1:g})")
    if y2 <= y1:
        raise RegionError(f"{label}: y2 ({y2:g}) must be greater than y1 ({y1:g})")
    return Box(x1 / width, y1 / height, x2 / width, y2 / height)


def parse_box(text, units, image_width=None, image_height=None, label="box"):
    """Parse "x1,y1,x2,y2" (commas or spaces, optional brackets) into a normalized Box.

    units "normalized": values in [0, 1]; units "pixels": values within the image size.
    """
    if units not in UNITS:
        raise RegionError(f"{label}: units {units!r} must be one of {', '.join(UNITS)}")
    values = _parse_numbers(text, label)
    if len(values) != 4:
        raise RegionError(f"{label}: expected 4 values x1,y1,x2,y2, got {len(values)} in {excerpt(text)}")
    if units == "normalized":
        return _box_in_frame(*values, 1.0, 1.0, "(normalized)", label)
    _check_image_size(image_width, image_height, label)
    return _box_in_frame(*values, image_width, image_height,
                         f"pixels of the {image_width}x{image_height} image", label)


def _parse_rowfirst_box(text, image_width, image_height, label):
    """The original's "[y1, x1, y2, x2]" in pixels of the condition image; "[]" is the full image."""
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        raise RegionError(f"{label}: {excerpt(stripped)} must be written [y1, x1, y2, x2] or []")
    values = _parse_numbers(stripped, label)
    if not values:
        return Box.full()
    if len(values) != 4:
        raise RegionError(f"{label}: expected 4 values [y1, x1, y2, x2], got {len(values)} in {excerpt(stripped)}")
    y1, x1, y2, x2 = values
    return _box_in_frame(x1, y1, x2, y2, image_width, image_height,
                         f"pixels of the {image_width}x{image_height} image", label)


def _split_entries(text):
    """Split on "|"; a blank text has no entries and one trailing "|" is allowed, as in the original."""
    if not text.strip():
        return []
    entries = text.split("|")
    if not entries[-1].strip():
        entries.pop()
    return entries


def _strip_brackets(prompt):
    return prompt.replace("[", "").replace("]", "").strip()


def parse_prompt_rewrite(text, image_width, image_height):
    """Import the original's '[prompt]-*-[negative]-*-[y1, x1, y2, x2]|...' into RegionSpecs.

    Boxes are pixels of the image_width x image_height condition image, row first.
    """
    _check_image_size(image_width, image_height, "prompt_rewrite")
    entries = _split_entries(text)
    check_region_count(len(entries), "prompt_rewrite")
    specs = []
    for number, entry in enumerate(entries, start=1):
        label = f"prompt_rewrite entry {number}"
        if not entry.strip():
            raise RegionError(f"{label}: is empty")
        parts = entry.split("-*-")
        if len(parts) != 3:
            raise RegionError(f"{label}: expected '[prompt]-*-[negative]-*-[y1, x1, y2, x2]', "
                              f"got {len(parts)} part(s) in {excerpt(entry.strip())}")
        prompt, negative, box_text = parts
        box = _parse_rowfirst_box(box_text, image_width, image_height, f"{label} box")
        specs.append(RegionSpec(_strip_brackets(prompt), _strip_brackets(negative), box))
    return specs


def parse_region_adapter_weights(text, image_width, image_height):
    """Import the original's region_*_adaptor_weight '[y1, x1, y2, x2]-weight|...' into (Box, weight) pairs."""
    _check_image_size(image_width, image_height, "adapter weights")
    pairs = []
    for number, entry in enumerate(_split_entries(text), start=1):
        label = f"adapter weight entry {number}"
        box_text, bracket, weight_text = entry.partition("]")
        if not bracket or not weight_text.strip().startswith("-"):
            raise RegionError(f"{label}: expected '[y1, x1, y2, x2]-weight', got {excerpt(entry.strip())}")
        box = _parse_rowfirst_box(box_text + bracket, image_width, image_height, f"{label} box")
        weight = _parse_numbers(weight_text.strip()[1:], f"{label} weight")
        if len(weight) != 1:
            raise RegionError(f"{label} weight: expected one number after '-', got {excerpt(weight_text.strip()[1:])}")
        pairs.append((box, weight[0]))
    return pairs


# ---------------------------------------------------------------- grids and masks

def token_grid(image_hw, num_tokens):
    """(h, w) of a layer with num_tokens query positions, for a latent of size image_hw = (H, W).

    SD downsamples with stride-2 convolutions (padding 1), so each level is ceil(size / 2).
    """
    height, width = (int(v) for v in image_hw)
    if height < 1 or width < 1:
        raise RegionError(f"token_grid: latent size {height}x{width} must be positive")
    if num_tokens < 1:
        raise RegionError(f"token_grid: num_tokens ({num_tokens}) must be positive")
    h, w = height, width
    while h * w > num_tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != num_tokens:
        raise RegionError(f"token_grid: {num_tokens} tokens match no stride-2 level of the "
                          f"{height}x{width} latent")
    return h, w


def _cell_bounds(box, h, w):
    """The original's rule: rows ceil(y1*h) : floor(y2*h), cols ceil(x1*w) : floor(x2*w)."""
    top = math.ceil(box.y1 * h - _GRID_EPS)
    bottom = math.floor(box.y2 * h + _GRID_EPS)
    left = math.ceil(box.x1 * w - _GRID_EPS)
    right = math.floor(box.x2 * w + _GRID_EPS)
    return top, bottom, left, right


def box_cells(box, h, w):
    """Bool [h, w]: the cells that lie wholly inside the box (may be none on a coarse grid)."""
    top, bottom, left, right = _cell_bounds(box, h, w)
    cells = torch.zeros(h, w, dtype=torch.bool)
    cells[top:bottom, left:right] = True
    return cells


def box_is_empty_on_grid(box, h, w):
    """True when the box covers no whole cell of an h x w grid, so box_cells is all False."""
    top, bottom, left, right = _cell_bounds(box, h, w)
    return bottom <= top or right <= left


def mask_to_grid(mask, h, w, label="mask"):
    """Float [h, w] weights from a soft mask [H, W] or [1, H, W] with values in [0, 1].

    Adaptive average pooling: each cell is the mean of its window of mask pixels. When H, W are
    multiples of h, w the windows tile the mask and this is the exact area average; otherwise
    cell i spans pixels floor(i*H/h) .. ceil((i+1)*H/h) - 1, so neighbouring windows overlap by
    up to one pixel. A mask of another aspect ratio is stretched to the grid.
    """
    grid = torch.as_tensor(mask)
    if grid.dim() == 3 and grid.shape[0] == 1:
        grid = grid[0]
    if grid.dim() != 2 or grid.numel() == 0:
        raise RegionError(f"{label}: expected shape [H, W] or [1, H, W], got {list(grid.shape)}")
    grid = grid.to(torch.float32)
    if torch.isnan(grid).any() or grid.min() < 0 or grid.max() > 1:
        raise RegionError(f"{label}: values must lie in [0, 1], got {grid.min().item():g}..{grid.max().item():g}")
    return F.adaptive_avg_pool2d(grid[None, None], (h, w))[0, 0]


def _region_grid(region, h, w, label):
    if isinstance(region, Box):
        return box_cells(region, h, w).to(torch.float32)
    if hasattr(region, "__array__"):  # torch tensor or numpy array
        return mask_to_grid(region, h, w, label)
    raise RegionError(f"{label}: expected a Box or a mask tensor, got {type(region).__name__}")


def region_weights(regions, h, w):
    """Float [R, h, w]: 1/0 cells for each Box, area-averaged weights for each mask."""
    grids = [_region_grid(region, h, w, f"region {number}") for number, region in enumerate(regions, start=1)]
    if not grids:
        return torch.zeros(0, h, w)
    return torch.stack(grids)


# ---------------------------------------------------------------- combining

def combine_region_outputs(global_out, region_outs, weights):
    """Mix region cross-attention outputs into the global one.

    global_out g [B, N, C]; region_outs o_r as [R, B, N, C] or a list of [B, N, C];
    weights w_r as [R, N] (or [R, h, w] with h*w = N). Per token, with s = sum_r w_r:

        out = g * (1 - min(s, 1)) + (sum_r w_r * o_r) * min(s, 1) / s    where s > 0
        out = g                                                          where s = 0

    For binary masks this is the original's rewrite: inside any region the global output is
    replaced, overlapping regions are averaged, outside all regions it is the global output.
    One soft region blends (1 - w) * g + w * o. Output has global_out's dtype and device;
    with no regions global_out itself is returned.
    """
    if isinstance(region_outs, (list, tuple)):
        if not region_outs:
            return global_out
        region_outs = torch.stack(list(region_outs))
    if region_outs.shape[0] == 0:
        return global_out
    if region_outs.shape[1:] != global_out.shape:
        raise RegionError(f"region_outs: shape {list(region_outs.shape)} must be [R, *{list(global_out.shape)}]")
    num_regions, num_tokens = region_outs.shape[0], global_out.shape[1]
    factor_dtype = torch.promote_types(global_out.dtype, torch.float32)
    weights = torch.as_tensor(weights).to(device=global_out.device, dtype=factor_dtype)
    if weights.dim() < 2 or weights.shape[0] != num_regions or weights[0].numel() != num_tokens:
        raise RegionError(f"weights: shape {list(weights.shape)} must be [{num_regions}, {num_tokens}]")
    if (weights < 0).any():
        raise RegionError(f"weights: must be non-negative, got minimum {weights.min().item():g}")
    weights = weights.reshape(num_regions, num_tokens)

    shares, coverage = region_shares(weights)
    regional = torch.einsum("rn,rbnc->bnc", shares.to(global_out.dtype), region_outs.to(global_out.dtype))
    mixed = global_out * (1 - coverage).to(global_out.dtype)[None, :, None] + regional
    return torch.where((coverage > 0)[None, :, None], mixed, global_out)


def region_shares(weights):
    """(shares [R, N], coverage [N]) of non-negative region weights [R, N], as combine_region_outputs
    uses them: out = g * (1 - coverage) + sum_r shares_r * o_r, with coverage = min(s, 1) and
    shares_r = w_r * min(s, 1) / s (0 where s = 0) for s = sum_r w_r."""
    total = weights.sum(0)
    coverage = total.clamp(max=1)
    shares = weights * torch.where(total > 0, coverage / total.clamp(min=1e-12), torch.zeros_like(total))
    return shares, coverage


def adapter_weight_map(global_weight, region_weights_list, h, w):
    """Float [h, w] weight map for an adapter/ControlNet feature map of size h x w.

    Starts at global_weight everywhere; each (region, weight) pair in order is composited over
    it with its grid alpha a (box_cells for a Box, mask_to_grid for a mask):
        map = map * (1 - a) + weight * a
    so a box overwrites its cells exactly as the original's region_*_adaptor_weight does, later
    regions override earlier ones, and a soft mask blends.
    """
    weight_map = torch.full((h, w), float(global_weight))
    for number, (region, weight) in enumerate(region_weights_list, start=1):
        alpha = _region_grid(region, h, w, f"adapter region {number}")
        weight_map = weight_map * (1 - alpha) + float(weight) * alpha
    return weight_map
