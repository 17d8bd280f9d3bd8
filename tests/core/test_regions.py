import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_mixofshow.mixofshow_core.regions import (
    MAX_REGION_CHUNKS, MAX_REGIONS, Box, RegionError, RegionSpec, adapter_weight_map, box_cells,
    box_is_empty_on_grid, check_region_tokens, combine_region_outputs, mask_to_grid, parse_box,
    parse_prompt_rewrite, parse_region_adapter_weights, region_weights, token_grid,
)


def grid_from_rows(rows):
    return torch.tensor([[c == "#" for c in row] for row in rows])


# ---------------------------------------------------------------- parse_box

@pytest.mark.parametrize("text", ["0.1,0.2,0.5,0.75", " 0.1 , 0.2 ,0.5, 0.75 ", "[0.1, 0.2, 0.5, 0.75]",
                                  "(0.1 0.2 0.5 0.75)", "0.1 0.2 0.5 0.75"])
def test_parse_box_normalized_formats(text):
    assert parse_box(text, "normalized") == Box(0.1, 0.2, 0.5, 0.75)


def test_parse_box_pixels_normalizes_by_image_size():
    assert parse_box("256, 128, 768, 512", "pixels", 1024, 512) == Box(0.25, 0.25, 0.75, 1.0)


def test_box_full():
    assert Box.full() == Box(0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("text, units, size, expected", [
    ("0.1,0.2,0.5", "normalized", None, "expected 4 values x1,y1,x2,y2, got 3"),
    ("0.1,0.2,0.5,0.6,0.7", "normalized", None, "got 5"),
    ("", "normalized", None, "got 0"),
    ("0.1,abc,0.5,0.6", "normalized", None, "'abc' is not a number"),
    ("0.1,,0.5,0.6", "normalized", None, "'' is not a number"),
    ("__import__('os').getcwd(),0,1,1", "normalized", None, "is not a number"),
    ("0.1,nan,0.5,0.6", "normalized", None, "'nan' is not a finite number"),
    ("0.1,0.2,1.5,0.6", "normalized", None, "x2 (1.5) must be within 0..1 (normalized)"),
    ("-0.1,0.2,0.5,0.6", "normalized", None, "x1 (-0.1) must be within 0..1"),
    ("0.5,0.2,0.3,0.6", "normalized", None, "x2 (0.3) must be greater than x1 (0.5)"),
    ("0.1,0.6,0.5,0.6", "normalized", None, "y2 (0.6) must be greater than y1 (0.6)"),
    ("0,0,1100,512", "pixels", (1024, 512), "x2 (1100) must be within 0..1024 pixels of the 1024x512 image"),
    ("0,0,100,600", "pixels", (1024, 512), "y2 (600) must be within 0..512"),
    ("0,0,100,100", "pixels", None, "pixel units need image_width and image_height"),
    ("0,0,100,100", "pixels", (0, 512), "image size 0x512 must be positive"),
    ("0,0,1,1", "percent", None, "units 'percent' must be one of normalized, pixels"),
])
def test_parse_box_errors_name_the_input(text, units, size, expected):
    width, height = size or (None, None)
    with pytest.raises(RegionError) as error:
        parse_box(text, units, width, height, label="region 2 box")
    message = str(error.value)
    assert message.startswith("region 2 box: ")
    assert expected in message


def test_region_error_is_value_error():
    assert issubclass(RegionError, ValueError)


# ---------------------------------------------------------------- the original's strings

def test_prompt_rewrite_original_example():
    text = ("[a <hina1> <hina2>, near a lake]-*-[lowres, bad hands]-*-[4, 28, 512, 251]|"
            "[a <dog1> <dog2>]-*-[]-*-[]|")
    specs = parse_prompt_rewrite(text, 1024, 512)
    assert specs == [
        RegionSpec("a <hina1> <hina2>, near a lake", "lowres, bad hands", Box(28 / 1024, 4 / 512, 251 / 1024, 1.0)),
        RegionSpec("a <dog1> <dog2>", "", Box.full()),
    ]
    assert specs[0].box == Box(x1=0.02734375, y1=0.0078125, x2=0.2451171875, y2=1.0)


def test_prompt_rewrite_blank_has_no_regions():
    assert parse_prompt_rewrite("  ", 1024, 512) == []


@pytest.mark.parametrize("text, expected", [
    ("a-*-b", "prompt_rewrite entry 1: expected '[prompt]-*-[negative]-*-[y1, x1, y2, x2]', got 2 part(s)"),
    ("a-*-b-*-[]|c-*-d-*-[]-*-e", "prompt_rewrite entry 2: expected"),
    ("a-*-b-*-[]||c-*-d-*-[]", "prompt_rewrite entry 2: is empty"),
    ("a-*-b-*-4, 28, 512, 251", "prompt_rewrite entry 1 box: '4, 28, 512, 251' must be written [y1, x1, y2, x2] or []"),
    ("a-*-b-*-[4, 28, 512]", "prompt_rewrite entry 1 box: expected 4 values [y1, x1, y2, x2], got 3"),
    ("a-*-b-*-[4, 28, 600, 251]", "prompt_rewrite entry 1 box: y2 (600) must be within 0..512 pixels"),
    ("a-*-b-*-[4, 300, 512, 251]", "prompt_rewrite entry 1 box: x2 (251) must be greater than x1 (300)"),
    ("a-*-b-*-[__import__('os').getcwd()]", "prompt_rewrite entry 1 box: \"__import__('os').getcwd()\" is not a number"),
])
def test_prompt_rewrite_malformed_entries(text, expected):
    with pytest.raises(RegionError) as error:
        parse_prompt_rewrite(text, 1024, 512)
    assert expected in str(error.value)


def test_prompt_rewrite_needs_image_size():
    with pytest.raises(RegionError, match="prompt_rewrite: image size 1024x0 must be positive"):
        parse_prompt_rewrite("a-*-b-*-[]", 1024, 0)


def test_prompt_rewrite_holds_at_most_the_region_cap():
    entry = "[a dragon]-*-[]-*-[]"
    assert len(parse_prompt_rewrite("|".join([entry] * MAX_REGIONS), 1024, 512)) == MAX_REGIONS
    with pytest.raises(RegionError, match=f"prompt_rewrite: {MAX_REGIONS + 1} regions, more than the {MAX_REGIONS}"):
        parse_prompt_rewrite("|".join([entry] * (MAX_REGIONS + 1)), 1024, 512)


def test_region_token_cap_counts_started_chunks():
    check_region_tokens([77 * (MAX_REGION_CHUNKS - 1), 77], "prompt")
    with pytest.raises(RegionError, match=f"regions: the region negative prompts hold {MAX_REGION_CHUNKS + 1} "
                                          f"chunks of 77 tokens in all, more than {MAX_REGION_CHUNKS}"):
        check_region_tokens([77 * (MAX_REGION_CHUNKS - 1), 78], "negative prompt")


def test_region_adapter_weights_original_format():
    pairs = parse_region_adapter_weights("[4, 28, 512, 251]-0.8|[0, 512, 256, 1024]--0.5", 1024, 512)
    assert pairs == [(Box(28 / 1024, 4 / 512, 251 / 1024, 1.0), 0.8), (Box(0.5, 0.0, 1.0, 0.5), -0.5)]


@pytest.mark.parametrize("text, expected", [
    ("[4, 28, 512, 251]0.8", "adapter weight entry 1: expected '[y1, x1, y2, x2]-weight'"),
    ("[4, 28, 512, 251]-0.8|4, 28, 512, 251", "adapter weight entry 2: expected"),
    ("[4, 28, 512, 251]-abc", "adapter weight entry 1 weight: 'abc' is not a number"),
    ("[4, 28, 512, 251]-", "adapter weight entry 1 weight: expected one number"),
    ("[4, 28, 512]-0.5", "adapter weight entry 1 box: expected 4 values"),
])
def test_region_adapter_weights_malformed(text, expected):
    with pytest.raises(RegionError) as error:
        parse_region_adapter_weights(text, 1024, 512)
    assert expected in str(error.value)


# ---------------------------------------------------------------- token grids

@pytest.mark.parametrize("latent, tokens, expected", [
    ((64, 64), 4096, (64, 64)), ((64, 64), 1024, (32, 32)), ((64, 64), 256, (16, 16)), ((64, 64), 64, (8, 8)),
    ((9, 13), 117, (9, 13)), ((9, 13), 35, (5, 7)), ((9, 13), 12, (3, 4)), ((9, 13), 4, (2, 2)),
    ((96, 64), 1536, (48, 32)), ((96, 64), 96, (12, 8)),
])
def test_token_grid(latent, tokens, expected):
    assert token_grid(latent, tokens) == expected


def test_token_grid_matches_stride2_convolutions_on_odd_latent():
    x = torch.zeros(1, 1, 9, 13)
    kernel = torch.zeros(1, 1, 3, 3)
    for _ in range(3):
        x = F.conv2d(x, kernel, stride=2, padding=1)
        assert token_grid((9, 13), x.shape[2] * x.shape[3]) == tuple(x.shape[2:])


@pytest.mark.parametrize("latent, tokens, expected", [
    ((64, 64), 100, "token_grid: 100 tokens match no stride-2 level of the 64x64 latent"),
    ((64, 64), 5000, "5000 tokens"),
    ((64, 64), 0, "num_tokens (0) must be positive"),
    ((0, 64), 64, "latent size 0x64 must be positive"),
])
def test_token_grid_errors(latent, tokens, expected):
    with pytest.raises(RegionError) as error:
        token_grid(latent, tokens)
    assert expected in str(error.value)


# ---------------------------------------------------------------- box cells

def test_box_cells_ceil_floor_on_8x8():
    # rows ceil(0.8)=1 : floor(7.2)=7, cols ceil(2.0)=2 : floor(6.4)=6
    expected = grid_from_rows([
        "........",
        "..####..",
        "..####..",
        "..####..",
        "..####..",
        "..####..",
        "..####..",
        "........",
    ])
    assert torch.equal(box_cells(Box(0.25, 0.1, 0.8, 0.9), 8, 8), expected)


def test_box_cells_ceil_floor_on_odd_5x7():
    # rows ceil(0.5)=1 : floor(4.5)=4, cols ceil(1.75)=2 : floor(5.6)=5
    expected = grid_from_rows([
        ".......",
        "..###..",
        "..###..",
        "..###..",
        ".......",
    ])
    assert torch.equal(box_cells(Box(0.25, 0.1, 0.8, 0.9), 5, 7), expected)


def test_box_smaller_than_a_cell_vanishes():
    box = Box(0.25, 0.1, 0.8, 0.9)  # rows ceil(0.2)=1 : floor(1.8)=1 on 2x2
    assert not box_cells(box, 2, 2).any()
    assert box_is_empty_on_grid(box, 2, 2)
    assert not box_is_empty_on_grid(box, 5, 7)


def test_box_cells_original_example_on_sd_grids():
    box = Box(28 / 1024, 4 / 512, 251 / 1024, 1.0)  # 1024x512 image -> 64x128 latent
    for (h, w), (top, left, right) in {(64, 128): (1, 4, 31), (32, 64): (1, 2, 15),
                                       (16, 32): (1, 1, 7), (8, 16): (1, 1, 3)}.items():
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[top:h, left:right] = True
        assert torch.equal(box_cells(box, h, w), expected), (h, w)


def test_box_edges_on_cell_borders_survive_float_noise():
    # a bare ceil/floor would give rows 15:28 here
    assert 0.28 * 50 > 14 and 0.58 * 50 < 29
    expected = torch.zeros(50, 50, dtype=torch.bool)
    expected[14:29, 14:29] = True
    assert torch.equal(box_cells(Box(0.28, 0.28, 0.58, 0.58), 50, 50), expected)


def test_full_box_covers_every_cell():
    assert box_cells(Box.full(), 3, 5).all()


# ---------------------------------------------------------------- masks

def test_mask_to_grid_half_image():
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4)
    assert torch.equal(mask_to_grid(mask, 4, 4), expected)
    assert torch.equal(mask_to_grid(mask[None], 4, 4), expected)


def test_mask_to_grid_area_average():
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                         [1.0, 1.0, 0.0, 0.0],
                         [0.0, 0.0, 0.5, 0.5],
                         [0.0, 0.0, 0.5, 0.5]])
    assert torch.equal(mask_to_grid(mask, 2, 2), torch.tensor([[0.75, 0.0], [0.0, 0.5]]))


def test_mask_to_grid_non_integer_factor_uses_overlapping_windows():
    # 6 -> 4 columns: windows [0,2), [1,3), [3,5), [4,6)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]] * 2)
    assert torch.equal(mask_to_grid(mask, 1, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("mask, expected", [
    (torch.full((4, 4), 1.5), "region 3 mask: values must lie in [0, 1], got 1.5..1.5"),
    (torch.full((4, 4), float("nan")), "region 3 mask: values must lie in [0, 1]"),
    (torch.zeros(2, 4, 4), "region 3 mask: expected shape [H, W] or [1, H, W], got [2, 4, 4]"),
    (torch.zeros(4), "got [4]"),
])
def test_mask_to_grid_errors(mask, expected):
    with pytest.raises(RegionError) as error:
        mask_to_grid(mask, 2, 2, label="region 3 mask")
    assert expected in str(error.value)


def test_region_weights_stacks_boxes_and_masks():
    mask = torch.zeros(1, 4, 4)
    mask[0, 2:, :] = 1
    weights = region_weights([Box(0.0, 0.0, 0.5, 0.5), mask], 2, 2)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]))
    assert region_weights([], 3, 2).shape == (0, 3, 2)


def test_region_weights_rejects_other_types():
    with pytest.raises(RegionError, match="region 2: expected a Box or a mask tensor, got str"):
        region_weights([Box.full(), "0,0,1,1"], 2, 2)


# ---------------------------------------------------------------- combining

def tokens(values):
    """[1, N, 1] tensor from a list of per-token values."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None]


def test_combine_no_regions_is_global():
    g = torch.randn(2, 4, 3)
    assert combine_region_outputs(g, [], torch.zeros(0, 4)) is g
    assert torch.equal(combine_region_outputs(g, torch.zeros(0, 2, 4, 3), torch.zeros(0, 4)), g)


def test_combine_full_region_is_region_output():
    g, o = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    assert torch.equal(combine_region_outputs(g, [o], torch.ones(1, 6)), o)


def test_combine_hand_computed_overlap():
    g = tokens([10, 20, 30, 40])
    o1, o2 = tokens([1, 2, 3, 4]), tokens([5, 6, 7, 8])
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    # token 0: o1 only; token 1: (2 + 6) / 2; token 2: o2 only; token 3: outside -> global
    assert torch.equal(combine_region_outputs(g, torch.stack([o1, o2]), weights), tokens([1, 4, 7, 40]))


def test_combine_binary_random_outside_global_inside_average():
    torch.manual_seed(0)
    g = torch.randn(2, 16, 8)
    outs = torch.randint(-64, 64, (2, 2, 16, 8)) / 8  # dyadic values: averages are exact
    weights = torch.stack([box_cells(Box(0.0, 0.0, 0.75, 0.75), 4, 4), box_cells(Box(0.5, 0.5, 1.0, 1.0), 4, 4)])
    weights = weights.reshape(2, 16).float()
    out = combine_region_outputs(g, outs, weights)
    outside, only1, only2, both = [((weights[0] == a) & (weights[1] == b)) for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))]
    assert outside.sum() == 4 and both.sum() == 1
    assert torch.equal(out[:, outside], g[:, outside])
    assert torch.equal(out[:, only1], outs[0][:, only1])
    assert torch.equal(out[:, only2], outs[1][:, only2])
    assert torch.equal(out[:, both], (outs[0][:, both] + outs[1][:, both]) / 2)


def original_rewrite(g, outs, boxes, h, w):
    """Mix-of-Show's region_rewrite with replace_ratio 1: count map, replace, divide by count."""
    count = torch.zeros(h, w)
    for box in boxes:
        count[math.ceil(box.y1 * h):math.floor(box.y2 * h), math.ceil(box.x1 * w):math.floor(box.x2 * w)] += 1
    g, outs = g.reshape(g.shape[0], h, w, -1), outs.reshape(outs.shape[0], outs.shape[1], h, w, -1)
    new = torch.zeros_like(g)
    new[:, count == 0] = g[:, count == 0]
    for box, o in zip(boxes, outs):
        rows = slice(math.ceil(box.y1 * h), math.floor(box.y2 * h))
        cols = slice(math.ceil(box.x1 * w), math.floor(box.x2 * w))
        new[:, rows, cols] += o[:, rows, cols] / count[rows, cols][None, :, :, None]
    return new.reshape(g.shape[0], h * w, -1)


def test_combine_matches_original_rewrite_for_boxes():
    torch.manual_seed(1)
    h, w = 5, 7
    boxes = [Box(0.0, 0.0, 0.6, 0.8), Box(0.3, 0.2, 1.0, 1.0), Box(0.25, 0.25, 0.75, 0.75)]
    g, outs = torch.randn(2, h * w, 4), torch.randn(3, 2, h * w, 4)
    weights = region_weights(boxes, h, w)
    out = combine_region_outputs(g, outs, weights)  # [R, h, w] weights are accepted
    torch.testing.assert_close(out, original_rewrite(g, outs, boxes, h, w), rtol=0, atol=1e-6)


def test_combine_soft_blend():
    g, o1, o2 = tokens([8, 8, 8]), tokens([4, 4, 4]), tokens([0, 0, 0])
    weights = torch.tensor([[0.25, 0.25, 0.75], [0.0, 0.25, 0.75]])
    # token 0: 0.75*8 + 0.25*4; token 1: s=0.5 -> 0.5*8 + 0.25*4 + 0.25*0; token 2: s=1.5 -> (3 + 0) / 1.5
    out = combine_region_outputs(g, [o1, o2], weights)
    torch.testing.assert_close(out, tokens([7, 5, 2]), rtol=0, atol=1e-6)


def reference_combine(g, outs, weights):
    g, outs, weights = g.double(), outs.double(), weights.double()
    out = g.clone()
    for n in range(g.shape[1]):
        s = weights[:, n].sum()
        if s > 0:
            mixed = sum(weights[r, n] * outs[r, :, n] for r in range(len(outs)))
            out[:, n] = g[:, n] * (1 - min(s, 1)) + mixed * min(s, 1) / s
    return out


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12),
                                         (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_combine_batch_and_dtypes(dtype, atol):
    torch.manual_seed(2)
    g, outs = torch.randn(3, 6, 4).to(dtype), torch.randn(2, 3, 6, 4).to(dtype)
    weights = torch.tensor([[0.0, 0.2, 1.0, 1.0, 0.6, 0.0], [0.0, 0.0, 0.5, 1.0, 0.9, 0.3]])
    out = combine_region_outputs(g, outs, weights)
    assert out.dtype == dtype and out.device == g.device and out.shape == g.shape
    torch.testing.assert_close(out.double(), reference_combine(g, outs, weights), rtol=0, atol=atol)
    assert torch.equal(out[:, 0], g[:, 0])


@pytest.mark.parametrize("outs, weights, expected", [
    (torch.zeros(2, 1, 4, 3), torch.ones(2, 5), "weights: shape [2, 5] must be [2, 4]"),
    (torch.zeros(2, 1, 4, 3), torch.ones(3, 4), "weights: shape [3, 4] must be [2, 4]"),
    (torch.zeros(2, 1, 4, 2), torch.ones(2, 4), "region_outs: shape [2, 1, 4, 2] must be [R, *[1, 4, 3]]"),
    (torch.zeros(1, 1, 4, 3), -torch.ones(1, 4), "weights: must be non-negative"),
])
def test_combine_errors(outs, weights, expected):
    with pytest.raises(RegionError) as error:
        combine_region_outputs(torch.zeros(1, 4, 3), outs, weights)
    assert expected in str(error.value)


# ---------------------------------------------------------------- adapter weight maps

def test_adapter_weight_map_later_regions_override():
    weight_map = adapter_weight_map(1.0, [(Box(0.0, 0.0, 0.5, 0.5), 0.5), (Box(0.25, 0.25, 0.75, 0.75), 0.0)], 4, 4)
    expected = torch.tensor([[0.5, 0.5, 1.0, 1.0],
                             [0.5, 0.0, 0.0, 1.0],
                             [1.0, 0.0, 0.0, 1.0],
                             [1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(weight_map, expected)


def test_adapter_weight_map_soft_mask_blends():
    mask = torch.zeros(4, 4)
    mask[:, :2] = 0.5
    weight_map = adapter_weight_map(0.8, [(mask, 0.0)], 2, 2)
    torch.testing.assert_close(weight_map, torch.tensor([[0.4, 0.8], [0.4, 0.8]]))


def test_adapter_weight_map_matches_original_on_adapter_resolutions():
    text, width, height = "[4, 28, 512, 251]-0.8|[0, 200, 300, 700]-0.3", 1024, 512
    pairs = parse_region_adapter_weights(text, width, height)
    for h, w in ((64, 128), (32, 64), (16, 32), (8, 16)):
        original = torch.ones(h, w)
        for entry in text.split("|"):
            (y1, x1, y2, x2), weight = [float(v) for v in entry.split("]")[0][1:].split(",")], float(entry.split("]-")[1])
            y1, y2, x1, x2 = y1 / height, y2 / height, x1 / width, x2 / width
            original[math.ceil(y1 * h):math.floor(y2 * h), math.ceil(x1 * w):math.floor(x2 * w)] = weight
        assert torch.equal(adapter_weight_map(1.0, pairs, h, w), original), (h, w)
