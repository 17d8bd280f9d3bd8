"""Per-step image transform and caption augmentation of Mix-of-Show's training data.

The image transform follows the original's HumanResizeCropFinalV3 (notes §1.6): after the
short edge is resized to R (done once when the dataset is loaded), with probability crop_p
a portrait keeps its top part (height w..h, the head stays in) and a landscape gets a random
R×R crop; the long edge is then resized to R (torchvision's resize(R-1, max_size=R)), and
the result is pasted at a random offset into a black R×R canvas. The image-valid mask is 1
on the pasted area. Masks reach latent size by bilinear interpolation: the original passes
INTER_NEAREST to cv2.resize in the `dst` position, so its masks are bilinear and soft.

SDXL's size conditioning reads the crop as the SDXL training scripts define it: the top-left
corner (top, left) of the random crop in the short-edge-resized image, (0, 0) without a crop.
The paste offset has no SDXL counterpart and is not encoded.
"""
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LATENT_SCALE = 8

# Our own wordings; "{}" receives the whole (shuffled) caption.
CAPTION_TEMPLATES = {
    "human": (
        "a photo of {}", "a portrait photo of {}", "a candid photo of {}", "a close-up photo of {}",
        "a full-body photo of {}", "a snapshot of {}", "a studio photo of {}", "a clear photo of {}",
        "a high quality photo of {}", "an outdoor photo of {}", "a cropped photo of {}",
        "a bright photo of {}", "a dim photo of {}", "a headshot of {}", "a picture of {}",
    ),
    "object": (
        "a photo of {}", "a photo of the {}", "a close-up photo of {}", "a product photo of {}",
        "a photo of {} on a table", "a photo of {} outdoors", "a cropped photo of {}",
        "a photo of a small {}", "a photo of a large {}", "a clean photo of {}", "a dark photo of {}",
        "a bright photo of {}", "a blurry photo of {}", "a detailed photo of {}", "a picture of {}",
        "a rendering of {}", "a photo of one {}", "an old photo of {}", "a sharp photo of {}",
    ),
    "style": (
        "an artwork in the style of {}", "a painting in the style of {}", "an illustration in the style of {}",
        "a drawing in the style of {}", "a sketch in the style of {}", "a picture in the style of {}",
        "a detailed artwork in the style of {}", "a colourful painting in the style of {}",
        "a dark painting in the style of {}", "a small painting in the style of {}",
        "a large painting in the style of {}", "a cropped artwork in the style of {}",
        "a clean illustration in the style of {}",
    ),
    "none": ("{}",),
}


class Placement(NamedTuple):
    canvas: Image.Image             # RGB, size x size
    concept: Optional[np.ndarray]   # concept mask [size, size] float, or None
    valid: np.ndarray               # image-valid mask [size, size] float
    crop_top_left: tuple            # (top, left) of the crop in the resized image


def place_on_canvas(image, mask, size, rng, crop_p=0.5):
    """The Placement of one training image: `image` (and `mask`) already have their short edge at `size`."""
    crop_top_left = (0, 0)
    if rng.random() < crop_p:
        image, mask, crop_top_left = _random_crop(image, mask, size, rng)
    image = _fit_long_edge(image, size)
    mask = _fit_long_edge(mask, size) if mask is not None else None
    width, height = image.size
    top, left = rng.randint(0, size - height), rng.randint(0, size - width)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image, (left, top))
    valid = np.zeros((size, size), np.float32)
    valid[top:top + height, left:left + width] = 1.0
    concept = None
    if mask is not None:
        concept = np.zeros((size, size), np.float32)
        concept[top:top + height, left:left + width] = np.asarray(mask, np.float32) / 255.0
    return Placement(canvas, concept, valid, crop_top_left)


def _random_crop(image, mask, size, rng):
    width, height = image.size
    if height > width:
        box = (0, 0, width, width + rng.randint(0, height - width))
    else:
        top, left = rng.randint(0, height - size), rng.randint(0, width - size)
        box = (left, top, left + size, top + size)
    return image.crop(box), mask.crop(box) if mask is not None else None, (box[1], box[0])


def _fit_long_edge(image, size):
    """torchvision resize(size - 1, max_size=size): the long edge ends at `size` (a square
    image ends at size - 1, as in the original)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size - 1, int((size - 1) * long / short)
    if new_long > size:
        new_short, new_long = int(size * short / long), size
    new = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new == image.size else image.resize(new, Image.BILINEAR)


def image_tensor(image):
    """[3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1).contiguous()


def to_latent_size(mask):
    """[H, W] pixel mask -> [1, H/8, W/8], bilinear with half-pixel centres (cv2.INTER_LINEAR)."""
    pixels = torch.from_numpy(mask)[None, None]
    size = (mask.shape[0] // LATENT_SCALE, mask.shape[1] // LATENT_SCALE)
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)[0]


def bind_placeholder(caption, placeholder, words):
    """The caption with the placeholder replaced by the concept words, spaces collapsed."""
    return " ".join(caption.replace(placeholder, " ".join(words)).split())


def shuffle_caption(caption, rng, keep=1):
    """Comma-separated chunks: the first `keep` stay, the rest are shuffled (ShuffleCaption)."""
    chunks = [c.strip() for c in caption.strip().split(",")]
    fixed, rest = chunks[:keep], chunks[keep:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


def apply_template(caption, template_type, rng):
    """The caption inside a random template of its type (EnhanceText)."""
    return rng.choice(CAPTION_TEMPLATES[template_type]).format(caption)


def longest_template(template_type):
    return max(CAPTION_TEMPLATES[template_type], key=len)
