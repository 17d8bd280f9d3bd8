"""Training images, captions and masks: scanned and checked before any step runs.

A dataset folder holds images with same-name `.txt` captions (first line used, as the
original's LoraDataset reads it); a caption must contain the placeholder (the original's
`<TOK>`), which training replaces by the concept's words. An image without a caption file
is captioned with the bare placeholder, as in the original. An optional masks folder holds
one same-name mask per image (white = concept), the same size as its image.
"""
import os
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the file and the problem."""


@dataclass(frozen=True)
class TrainingSample:
    """One training image, already resized so its short edge is the training resolution."""
    name: str
    image: Image.Image          # RGB
    caption: str                # still holds the placeholder
    mask: Image.Image = None    # L, same size as image, or None
    original_size: tuple = None  # (height, width) as read, before the resize; None: image's size

    @property
    def size_before_resize(self):
        """(height, width) of the image file: SDXL's original-size conditioning."""
        return self.original_size or (self.image.size[1], self.image.size[0])


def load_dataset(folder, placeholder, resolution, masks_folder=None):
    """Every sample of `folder`, in file-name order; raises DatasetError before training."""
    images = image_files(folder)
    if masks_folder and not os.path.isdir(masks_folder):
        raise DatasetError(f"masks folder {masks_folder}: not a folder")
    return [_load_sample(folder, name, placeholder, resolution, masks_folder) for name in images]


def image_files(folder):
    if not folder or not os.path.isdir(folder):
        raise DatasetError(f"dataset folder {folder!r}: not a folder")
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DatasetError(f"dataset folder {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return names


def read_caption(folder, image_name, placeholder):
    path = os.path.join(folder, os.path.splitext(image_name)[0] + ".txt")
    if not os.path.isfile(path):
        return placeholder
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read as UTF-8 text") from e
    caption = lines[0].strip() if lines else ""
    if placeholder not in caption:
        raise DatasetError(f"{path}: the caption (first line) does not contain the placeholder {placeholder}; "
                           f"write it where the concept is named, e.g. 'a photo of {placeholder}, smiling'")
    return caption


def read_image(path, mode):
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: refused, more than {2 * Image.MAX_IMAGE_PIXELS} pixels "
                           f"(a decompression bomb or a needlessly huge image)") from e
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"{path}: cannot be read as an image ({e})") from e


def find_mask(masks_folder, image_name):
    stem = os.path.splitext(image_name)[0]
    for ext in IMAGE_EXTENSIONS:
        for candidate in (stem + ext, stem + ext.upper()):
            path = os.path.join(masks_folder, candidate)
            if os.path.isfile(path):
                return path
    raise DatasetError(f"{os.path.join(masks_folder, stem + '.png')}: no mask for {image_name} "
                       f"(every image needs a same-name mask when a masks folder is given)")


def resize_short_edge(image, size):
    """Short edge to `size`, long edge int(size·long/short), bilinear (torchvision's resize)."""
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    return image if new == image.size else image.resize(new, Image.BILINEAR)


def _load_sample(folder, name, placeholder, resolution, masks_folder):
    image = read_image(os.path.join(folder, name), "RGB")
    caption = read_caption(folder, name, placeholder)
    mask = None
    if masks_folder:
        mask_path = find_mask(masks_folder, name)
        mask = read_image(mask_path, "L")
        if mask.size != image.size:
            raise DatasetError(f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} but {name} is "
                               f"{image.size[0]}x{image.size[1]}; a mask must match its image")
        mask = resize_short_edge(mask, resolution)
    original_size = (image.size[1], image.size[0])
    return TrainingSample(name, resize_short_edge(image, resolution), caption, mask, original_size)
