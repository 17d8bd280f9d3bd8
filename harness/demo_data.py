"""Generated training sets for the demo's three concepts: seeded drawings of one toy animal each
(a round orange "cat" with pointed ears, a brown "dog" with floppy ears, a grey "owl" with ear tufts) at varied places, sizes
and backgrounds, with same-name captions holding the placeholder and white-on-black masks.

Each concept's folder looks like a user's: NN.png with its caption NN.txt, and masks/NN.png.
"""
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PLACEHOLDER = "<TOK>"
BACKGROUNDS = ((112, 160, 96), (150, 185, 220), (220, 210, 180), (90, 90, 110))
SETTINGS = ("on the grass", "under a blue sky", "on a sandy floor", "at night")
ANIMALS = {
    "cat": {"body": (235, 140, 40), "ear": "pointed", "class_word": "cat"},
    "dog": {"body": (130, 85, 50), "ear": "floppy", "class_word": "dog"},
    "owl": {"body": (150, 150, 160), "ear": "pointed", "class_word": "owl"},
}


def draw_animal(size, animal, rng):
    """(RGB image, L mask) of one drawing of `animal` on a random background."""
    spec = ANIMALS[animal]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = Image.new("RGB", (size, size), background)
    mask = Image.new("L", (size, size), 0)
    radius = int(size * rng.uniform(0.18, 0.3))
    cx, cy = (int(rng.uniform(radius * 1.3, size - radius * 1.3)) for _ in range(2))
    shapes = [("ellipse", (cx - radius, cy - radius, cx + radius, cy + radius))]
    if spec["ear"] == "pointed":
        for side in (-1, 1):
            base = cx + side * radius // 2
            shapes.append(("polygon", [(base - radius // 3, cy - radius // 2), (base + radius // 3, cy - radius // 2),
                                       (base + side * radius // 4, cy - int(radius * 1.4))]))
    else:
        for side in (-1, 1):
            x = cx + side * radius
            shapes.append(("ellipse", (x - radius // 3, cy - radius // 3, x + radius // 3, cy + int(radius * 0.9))))
    for canvas, colour in ((ImageDraw.Draw(image), spec["body"]), (ImageDraw.Draw(mask), 255)):
        for kind, points in shapes:
            getattr(canvas, kind)(points, fill=colour)
    eyes = ImageDraw.Draw(image)
    for side in (-1, 1):
        x, y, r = cx + side * radius // 3, cy - radius // 5, max(1, radius // 8)
        eyes.ellipse((x - r, y - r, x + r, y + r), fill=(20, 20, 20))
    return image, mask


def write_concept_dataset(folder, animal, count=4, size=128, seed=0):
    """Writes `count` drawings of `animal` with captions into folder and their masks into
    folder/masks (kept when they exist); returns (images folder, masks folder)."""
    images, masks = Path(folder), Path(folder) / "masks"
    if len(list(images.glob("*.png"))) == count and len(list(masks.glob("*.png"))) == count:
        return images, masks
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, mask = draw_animal(size, animal, rng)
        stem = f"{index:02d}"
        _write_atomic(images / f"{stem}.png", image.save)
        _write_atomic(masks / f"{stem}.png", mask.save)
        caption = f"{PLACEHOLDER}, {SETTINGS[index % len(SETTINGS)]}\n"
        (images / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return images, masks


def _write_atomic(path, save):
    tmp = path.with_name("." + path.name + ".partial")
    save(tmp, format="PNG")
    os.replace(tmp, path)
