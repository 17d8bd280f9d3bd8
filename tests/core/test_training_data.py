"""Training data: dataset checks, the original's resize/crop/pad transform, masks, captions."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_mixofshow.harness.hostile_files import decompression_bomb_png
from comfyui_mixofshow.mixofshow_core.training.dataset import DatasetError, load_dataset
from comfyui_mixofshow.mixofshow_core.training.loop import steps_for_repeats
from comfyui_mixofshow.mixofshow_core.training.transforms import (CAPTION_TEMPLATES, apply_template, bind_placeholder,
                                                                  image_tensor, place_on_canvas, shuffle_caption,
                                                                  to_latent_size)

TOK = "<TOK>"


def write_image(path, width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


@pytest.fixture
def dataset(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    write_image(images / "b.png", 64, 48, seed=1)
    write_image(images / "a.jpg", 48, 96, seed=2)
    (images / "a.txt").write_text(f"a photo of {TOK}, smiling\nsecond line is ignored\n")
    (images / "notes.md").write_text("not an image")
    write_image(masks / "b.png", 64, 48, seed=3, mode="L")
    write_image(masks / "a.png", 48, 96, seed=4, mode="L")
    return images, masks


def test_samples_come_in_name_order_with_captions_masks_and_short_edge_at_resolution(dataset):
    images, masks = dataset
    samples = load_dataset(str(images), TOK, 32, str(masks))
    assert [s.name for s in samples] == ["a.jpg", "b.png"]
    assert samples[0].caption == f"a photo of {TOK}, smiling"
    assert samples[1].caption == TOK  # no caption file: the bare placeholder, as the original
    assert [s.image.size for s in samples] == [(32, 64), (42, 32)]
    assert [s.mask.size for s in samples] == [(32, 64), (42, 32)]
    assert samples[0].image.mode == "RGB" and samples[0].mask.mode == "L"


def test_masks_are_optional(dataset):
    images, _ = dataset
    assert all(s.mask is None for s in load_dataset(str(images), TOK, 32))


@pytest.mark.parametrize("case, message", [
    ("missing folder", "not a folder"),
    ("empty folder", "no images"),
    ("unreadable image", "c.png: cannot be read as an image"),
    ("caption without placeholder", r"b.txt: the caption \(first line\) does not contain the placeholder <TOK>"),
    ("decompression bomb", "c.png: refused, more than"),
    ("mask size mismatch", "b.png: mask is 32x32 but b.png is 64x48"),
    ("missing mask", "no mask for a.jpg"),
])
def test_bad_datasets_name_the_file_and_the_problem(tmp_path, dataset, case, message):
    images, masks = dataset
    if case == "missing folder":
        images = tmp_path / "nowhere"
    elif case == "empty folder":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "unreadable image":
        (images / "c.png").write_bytes(b"not a png at all")
    elif case == "caption without placeholder":
        (images / "b.txt").write_text("secret words\nmore")
    elif case == "decompression bomb":
        decompression_bomb_png(images / "c.png")
    elif case == "mask size mismatch":
        write_image(masks / "b.png", 32, 32, mode="L")
    elif case == "missing mask":
        (masks / "a.png").unlink()
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset(str(images), TOK, 32, str(masks))
    assert "secret" not in str(error.value)  # file contents are never echoed


def test_square_image_without_crop_is_pasted_at_size_minus_one_into_a_black_canvas():
    image = Image.new("RGB", (64, 64), (200, 100, 50))
    canvas, concept, valid = place_on_canvas(image, None, 64, random.Random(0), crop_p=0.0)[:3]
    pixels = np.asarray(canvas)
    assert concept is None and valid.sum() == 63 * 63
    assert (pixels[valid == 1] == (200, 100, 50)).all() and (pixels[valid == 0] == 0).all()


def test_portrait_crop_keeps_the_top_rows():
    rows = np.repeat(np.arange(128, dtype=np.uint8)[:, None], 64, axis=1) * 2  # brightness = 2 * row
    image = Image.fromarray(np.stack([rows] * 3, -1))
    for seed in range(5):
        canvas, _, valid = place_on_canvas(image, None, 64, random.Random(seed), crop_p=1.0)[:3]
        top = np.argmax(valid.any(axis=1))
        height, width = valid.any(axis=1).sum(), valid.any(axis=0).sum()
        assert width <= height == 64
        assert np.asarray(canvas)[top, :, 0][valid[top] == 1].max() <= 4  # the image's first rows


def test_landscape_crop_is_a_square_of_the_short_edge():
    image = Image.new("RGB", (96, 64), (255, 255, 255))
    _, _, valid = place_on_canvas(image, None, 64, random.Random(1), crop_p=1.0)[:3]
    assert valid.sum() == 63 * 63


def test_long_edge_is_resized_to_the_canvas_and_offsets_vary():
    image = Image.new("RGB", (64, 96))
    offsets = set()
    for seed in range(8):
        _, _, valid = place_on_canvas(image, None, 64, random.Random(seed), crop_p=0.0)[:3]
        assert valid.any(axis=1).sum() == 64 and valid.any(axis=0).sum() == 42
        offsets.add(int(np.argmax(valid.any(axis=0))))
    assert len(offsets) > 1


def test_concept_mask_moves_with_the_image():
    pixels = np.zeros((96, 64), np.uint8)
    pixels[10:40, 20:50] = 255
    image, mask = Image.fromarray(np.stack([pixels] * 3, -1)), Image.fromarray(pixels, "L")
    for seed in range(4):
        canvas, concept, _ = place_on_canvas(image, mask, 64, random.Random(seed), crop_p=0.5)[:3]
        assert np.allclose(np.asarray(canvas, np.float32)[..., 0] / 255.0, concept, atol=1e-6)


def test_masks_reach_latent_size_like_cv2_inter_linear():
    mask = np.random.default_rng(0).random((64, 48)).astype(np.float32)
    # cv2.INTER_LINEAR shrinking by 8 samples at pixel 8i + 3.5: the mean of pixels 3 and 4 of each block
    expected = mask.reshape(8, 8, 6, 8)[:, 3:5, :, 3:5].mean(axis=(1, 3))
    assert torch.allclose(to_latent_size(mask)[0], torch.from_numpy(expected), atol=1e-6)


def test_image_tensor_is_channels_first_in_unit_range():
    tensor = image_tensor(Image.new("RGB", (4, 2), (255, 0, 51)))
    assert tensor.shape == (3, 2, 4) and torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_placeholder_becomes_the_concept_words_with_spaces_collapsed():
    assert bind_placeholder(f"  a  {TOK},  smiling ", TOK, ("<a1>", "<a2>")) == "a <a1> <a2>, smiling"


def test_shuffle_caption_keeps_the_first_chunk_and_permutes_the_rest():
    caption = "<a1> <a2>, red shirt, blue sky, smiling, outdoors"
    results = {shuffle_caption(caption, random.Random(seed)) for seed in range(20)}
    assert len(results) > 1
    for result in results:
        chunks = result.split(", ")
        assert chunks[0] == "<a1> <a2>" and sorted(chunks[1:]) == sorted(["red shirt", "blue sky", "smiling", "outdoors"])


def test_templates_wrap_the_whole_caption_once():
    for kind, templates in CAPTION_TEMPLATES.items():
        assert len(set(templates)) == len(templates) and all(t.count("{}") == 1 for t in templates), kind
        assert "<a1>, red" in apply_template("<a1>, red", kind, random.Random(0))
    assert apply_template("x, y", "none", random.Random(0)) == "x, y"


def test_steps_count_like_the_original():
    assert steps_for_repeats(20, 500, 4) == 2500
    assert steps_for_repeats(3, 5, 2) == 8  # 7.5 iterations: the original's loop runs 8
