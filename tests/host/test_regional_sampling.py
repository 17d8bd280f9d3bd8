"""Regional sampling (issue 4) against plain sampling and a plain-torch reference of the region rewrite."""
import copy
import dataclasses

import comfy.controlnet
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import nodes as comfy_nodes
import pytest
import torch

from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.harness.models import write_t2i_adapter
from comfyui_mixofshow.mixofshow_core.regions import MAX_REGION_CHUNKS, MAX_REGIONS, Box, RegionError
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora
from comfyui_mixofshow.nodes.layerwise import UnroutedConditioningError
from comfyui_mixofshow.nodes.region_prompt import RegionPrompt, RegionPromptImport, RegionsFromBoundingBoxes
from comfyui_mixofshow.nodes.regional_attention import RegionalAttention
from comfyui_mixofshow.nodes.regional_sampler import RegionalSampler, apply_regions

from . import reference
from .sampling import denoise_once

PROMPT, NEGATIVE = "a castle on a hill", "blurry"
IMAGE_W, IMAGE_H = 104, 72  # pixels of a 13 x 9 latent


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def add_region(clip, prompt, box="0, 0, 1, 1", negative="", regions=(), units="normalized", width=512,
               height=512, adapter_weight=1.0, mask=None):
    return RegionPrompt().add_region(clip, prompt, negative, box, units, width, height, adapter_weight,
                                     regions=regions, mask=mask)[0]


def ksample(model, positive, negative, latent, sampler="euler", steps=1, cfg=1.0, regions=()):
    return RegionalSampler().sample(model, positive, negative, regions, {"samples": latent}, 7, steps, cfg, sampler,
                                    "normal", 1.0)[0]["samples"]


class LayerRecorder:
    """Records cross-attention layer `index`: query inputs, to_k inputs (with regions: the global
    context followed by the region contexts) and the attention output before to_out."""

    def __init__(self, model, index):
        self.attn2 = reference.cross_attention_modules(model.model.diffusion_model)[index]

    def __enter__(self):
        self.queries, self.contexts, self.outputs = [], [], []
        hooks = ((self.attn2.to_q, self.queries), (self.attn2.to_k, self.contexts), (self.attn2.to_out[0], self.outputs))
        self.handles = [module.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].clone()))
                        for module, seen in hooks]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def layer_output(model, positive, negative, index=0, cfg=1.0):
    """Attention output of layer `index` in the first UNet call of a one-step sampler."""
    with LayerRecorder(model, index) as recorder:
        denoise_once(model, positive, negative, cfg)
    return recorder.outputs[0]


def reference_attention(attn2, x, context):
    """softmax(q kᵀ / √d) v per head, from the module's weights, in float64."""
    def project(linear, h):
        return h.double() @ linear.weight.double().T

    heads = attn2.heads
    q, k, v = (project(lin, h).unflatten(-1, (heads, -1)).transpose(1, 2)
               for lin, h in ((attn2.to_q, x), (attn2.to_k, context), (attn2.to_v, context)))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def box_cells(box_px, h, w):
    """The original's rule on an h x w grid for a pixel box (x1, y1, x2, y2) of the IMAGE_W x IMAGE_H
    image: rows ceil(y1·h) .. floor(y2·h), columns ceil(x1·w) .. floor(x2·w) (exact integers)."""
    x1, y1, x2, y2 = box_px
    cells = torch.zeros(h, w, dtype=torch.float64)
    cells[-(-y1 * h // IMAGE_H):y2 * h // IMAGE_H, -(-x1 * w // IMAGE_W):x2 * w // IMAGE_W] = 1
    return cells.flatten()


def reference_rewrite(attn2, x, global_context, region_contexts, cells):
    """Mix-of-Show's region rewrite: the mean of the covering regions' attention, global elsewhere."""
    out = reference_attention(attn2, x, global_context)
    count = sum(cells)
    regional = sum(c[None, :, None] * reference_attention(attn2, x, ctx) for c, ctx in zip(cells, region_contexts))
    covered = (count > 0)[None, :, None]
    return torch.where(covered, regional / count.clamp(min=1)[None, :, None], out)


@pytest.fixture
def prompts(clip):
    return encode(clip, PROMPT), encode(clip, NEGATIVE)


# ---------------------------------------------------------------- invariants

def test_no_regions_is_plain_sampling(model, clip, prompts):
    positive, negative = prompts
    assert apply_regions(model, positive, negative, ()) == (model, positive, negative)
    patched = apply_regions(model, positive, negative, add_region(clip, "a dragon", "0, 0, 0.5, 1"))[0]
    plain = denoise_once(model, positive, negative, 5.0)[1]
    assert torch.equal(denoise_once(patched, positive, negative, 5.0)[1], plain)


def test_full_image_region_with_the_global_prompt_is_plain_sampling(model, clip, prompts):
    positive, negative = prompts
    regions = add_region(clip, PROMPT, negative=NEGATIVE)
    regional = apply_regions(model, positive, negative, regions)
    assert torch.allclose(denoise_once(*regional, 5.0)[1], denoise_once(model, positive, negative, 5.0)[1],
                          atol=1e-6, rtol=0)


def test_outside_every_region_the_attention_output_is_the_global_one(model, clip, prompts):
    positive, negative = prompts
    regional = apply_regions(model, positive, negative, add_region(clip, "a dragon", "0, 0, 0.5, 0.5"))
    plain, ours = layer_output(model, positive, negative), layer_output(*regional)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:4, :4] = True
    inside = inside.flatten()
    assert torch.equal(ours[:, ~inside], plain[:, ~inside])
    assert (ours[:, inside] - plain[:, inside]).abs().min() > 0


def test_overlapping_regions_are_averaged(model, clip, prompts):
    positive, negative = prompts
    left = add_region(clip, "a dragon", "0, 0, 0.75, 1")
    right = add_region(clip, "a knight", "0.25, 0, 1, 1")
    only_left = layer_output(*apply_regions(model, positive, negative, left))
    only_right = layer_output(*apply_regions(model, positive, negative, right))
    both = layer_output(*apply_regions(model, positive, negative, left + right))
    assert torch.allclose(both.unflatten(1, (8, 8))[:, :, 2:6], (only_left + only_right).unflatten(1, (8, 8))[:, :, 2:6] / 2,
                          atol=1e-6)
    assert torch.equal(both.unflatten(1, (8, 8))[:, :, :2], only_left.unflatten(1, (8, 8))[:, :, :2])
    assert torch.equal(both.unflatten(1, (8, 8))[:, :, 6:], only_right.unflatten(1, (8, 8))[:, :, 6:])


@pytest.mark.parametrize("index, grid", [(0, (9, 13)), (4, (3, 4)), (6, (2, 2))])
def test_region_rewrite_matches_plain_torch_reference_on_odd_latent(model, clip, prompts, index, grid):
    positive, negative = prompts
    boxes = [(0, 0, 64, 72), (40, 16, 104, 72)]  # x1, y1, x2, y2 pixels; overlap at full resolution
    regions = add_region(clip, "a red dragon", ", ".join(map(str, boxes[0])), units="pixels", width=IMAGE_W, height=IMAGE_H)
    regions = add_region(clip, "a knight in armour", ", ".join(map(str, boxes[1])), regions=regions, units="pixels",
                         width=IMAGE_W, height=IMAGE_H)
    regional = apply_regions(model, positive, negative, regions)
    with LayerRecorder(model, index) as recorder:
        ksample(*regional, torch.zeros(2, 4, 9, 13))
    x, global_context = recorder.queries[0], recorder.contexts[0][:, :77]
    assert x.shape[:2] == (2, grid[0] * grid[1])
    region_contexts = [r.positive[:, index].expand(2, -1, -1) for r in regions]
    assert torch.equal(recorder.contexts[0][:, 77:], torch.cat(region_contexts, dim=1))
    cells = [box_cells(box, *grid) for box in boxes]
    expected = reference_rewrite(recorder.attn2, x, global_context, region_contexts, cells)
    assert torch.allclose(recorder.outputs[0].double(), expected, atol=1e-5, rtol=1e-5)


def test_soft_mask_weights_region_against_global(model, clip, prompts):
    positive, negative = prompts
    mask = torch.full((1, IMAGE_H, IMAGE_W), 0.25)
    regions = add_region(clip, "a red dragon", width=IMAGE_W, height=IMAGE_H, mask=mask)
    regional = apply_regions(model, positive, negative, regions)
    with LayerRecorder(model, 6) as recorder:
        ksample(*regional, torch.zeros(1, 4, 9, 13))
    x, global_context = recorder.queries[0], recorder.contexts[0][:, :77]
    expected = (0.75 * reference_attention(recorder.attn2, x, global_context)
                + 0.25 * reference_attention(recorder.attn2, x, regions[0].positive[:, 6]))
    assert torch.allclose(recorder.outputs[0].double(), expected, atol=1e-5, rtol=1e-5)


def test_uncond_rows_use_the_region_negative_prompts(model, clip, prompts):
    positive, negative = prompts
    box = "0.25, 0, 1, 0.75"
    full = denoise_once(*apply_regions(model, positive, negative,
                                       add_region(clip, "a dragon", box, negative="a knight")), 3.0)[1]
    cond = denoise_once(*apply_regions(model, positive, positive, add_region(clip, "a dragon", box)), 1.0)[1]
    uncond = denoise_once(*apply_regions(model, negative, negative, add_region(clip, "a knight", box)), 1.0)[1]
    assert torch.allclose(full, uncond + 3.0 * (cond - uncond), atol=1e-5)
    plain_negative = denoise_once(*apply_regions(model, positive, negative, add_region(clip, "a dragon", box)), 3.0)[1]
    assert (full - plain_negative).abs().max() > 1e-4


def long_prompt(tokens):
    """A prompt of `tokens` one-token words."""
    return " ".join(["castle", "dragon"] * (tokens // 2))


def test_regions_of_very_different_lengths_attend_to_their_own_unpadded_tokens(model, clip, prompts):
    positive, negative = prompts
    boxes = [(0, 0, 64, 72), (40, 16, 104, 72)]
    regions = add_region(clip, "a red dragon", ", ".join(map(str, boxes[0])), negative=long_prompt(160),
                         units="pixels", width=IMAGE_W, height=IMAGE_H)
    regions = add_region(clip, long_prompt(320), ", ".join(map(str, boxes[1])), regions=regions, units="pixels",
                         width=IMAGE_W, height=IMAGE_H)
    assert [(r.positive.shape[2], r.negative.shape[2]) for r in regions] == [(77, 231), (385, 77)]
    regional = apply_regions(model, positive, negative, regions)
    with LayerRecorder(model, 0) as recorder:
        ksample(*regional, torch.zeros(1, 4, 9, 13), cfg=5.0)
    x, contexts, out = recorder.queries[0], recorder.contexts[0], recorder.outputs[0]
    assert x.shape[0] == 2, "cond and uncond rows must share the call for this test to mean anything"
    cells = [box_cells(box, 9, 13) for box in boxes]
    for row in range(2):
        is_cond = torch.equal(contexts[row, :77], positive[0][0][0])
        assert is_cond or torch.equal(contexts[row, :77], negative[0][0][0])
        own = [(r.positive if is_cond else r.negative)[:, 0] for r in regions]
        expected = reference_rewrite(recorder.attn2, x[row:row + 1], contexts[row:row + 1, :77], own, cells)
        assert torch.allclose(out[row:row + 1].double(), expected, atol=1e-5, rtol=1e-5), row


def test_a_deep_copied_model_projects_regions_with_its_own_weights(model, clip, prompts):
    positive, negative = prompts
    regions = add_region(clip, "a dragon", "0, 0, 0.5, 1", negative="ugly")
    patched, region_positive, region_negative = apply_regions(model, positive, negative, regions)
    copied = patched.clone()
    copied.model = copy.deepcopy(patched.model)
    original = denoise_once(patched, region_positive, region_negative, 5.0)[1]
    assert torch.equal(denoise_once(copied, region_positive, region_negative, 5.0)[1], original)

    attn2 = reference.cross_attention_modules(copied.model.diffusion_model)[0]
    with torch.no_grad():
        attn2.to_k.weight.mul_(3.0)
        attn2.to_v.weight.mul_(-2.0)
    with LayerRecorder(copied, 0) as recorder:
        denoise_once(copied, region_positive, region_negative, 1.0)
    x, global_context = recorder.queries[0], recorder.contexts[0][:, :77]
    expected = reference_rewrite(attn2, x, global_context, [regions[0].positive[:, 0]], [box_cells((0, 0, 52, 72), 8, 8)])
    assert torch.allclose(recorder.outputs[0].double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(denoise_once(copied, region_positive, region_negative, 5.0)[1], original)


# ---------------------------------------------------------------- samplers, batches, sizes

@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_samplers_run_on_an_odd_latent(model, clip, prompts, sampler):
    positive, negative = prompts
    regions = add_region(clip, "a dragon", "0, 0, 64, 72", negative="ugly", units="pixels", width=IMAGE_W, height=IMAGE_H)
    latent = torch.zeros(1, 4, 9, 13)
    regional = ksample(model, positive, negative, latent, sampler, steps=2, cfg=5.0, regions=regions)
    plain = ksample(model, positive, negative, latent, sampler, steps=2, cfg=5.0)
    assert regional.shape == latent.shape and torch.isfinite(regional).all()
    assert (regional - plain).abs().max() > 1e-4


def test_batch_of_two_matches_single_rows(model, clip, prompts):
    positive, negative = prompts
    regions = add_region(clip, "a dragon", "0, 0, 0.5, 1", negative="ugly")
    single = ksample(model, positive, negative, torch.zeros(1, 4, 8, 8), steps=2, cfg=5.0, regions=regions)
    double = ksample(model, positive, negative, torch.zeros(2, 4, 8, 8), steps=2, cfg=5.0, regions=regions)
    assert torch.allclose(double[:1], single, atol=1e-5)


# ---------------------------------------------------------------- concepts

@pytest.fixture
def concept_pair(model, clip):
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    edlora = random_edlora(["<a1>", "<a2>"], unet_shapes, text_shapes, seed=3, embedding_scale=0.5)
    return apply_edlora(model, clip, edlora, 0.7, 0.6)


def test_region_concept_words_reach_each_layer_with_their_own_encoding(concept_pair):
    patched_model, patched_clip = concept_pair
    regions = add_region(patched_clip, "a photo of <a1> <a2>", "0, 0, 0.5, 1")
    positive, negative = encode(patched_clip, PROMPT), encode(patched_clip, NEGATIVE)
    regional = apply_regions(patched_model, positive, negative, regions)
    for index in (0, 15):
        with LayerRecorder(patched_model, index) as recorder:
            denoise_once(*regional, 1.0)
        assert torch.equal(recorder.contexts[0][:, 77:], regions[0].positive[:, index])
    assert not torch.allclose(regions[0].positive[:, 0], regions[0].positive[:, 15], atol=1e-3)


def test_region_concept_words_on_a_model_without_their_edlora_fail_clearly(model, concept_pair):
    _, patched_clip = concept_pair
    regions = add_region(patched_clip, "<a1> <a2> waving", "0, 0, 0.5, 1")
    positive, negative = encode(patched_clip, PROMPT), encode(patched_clip, NEGATIVE)
    with pytest.raises(RegionError, match=r"region 1: uses concept words <a1>, <a2> but the MODEL has no ED-LoRA"):
        apply_regions(model, positive, negative, regions)


def test_unknown_concept_word_in_a_region_names_the_input(concept_pair):
    _, patched_clip = concept_pair
    with pytest.raises(RegionError, match="negative_prompt: unknown concept word <b1>"):
        add_region(patched_clip, "<a1> <a2>", negative="<b1>")


# ---------------------------------------------------------------- spatial control

@pytest.fixture
def controlled(tmp_path, clip, prompts):
    """(positive, negative, adapter, pose): a seeded T2I-Adapter applied with the stock node."""
    adapter = comfy.controlnet.load_controlnet(write_t2i_adapter(str(tmp_path / "keypose.safetensors")))
    pose = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    return prompts + (adapter, pose)


def apply_control(positive, negative, adapter, pose, strength):
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, adapter, pose, strength, 0.0, 1.0)


def test_region_adapter_weight_scales_control_like_strength(model, clip, controlled):
    positive, negative, adapter, pose = controlled
    regions = add_region(clip, PROMPT, negative=NEGATIVE, adapter_weight=0.5)
    regional = apply_regions(model, *apply_control(positive, negative, adapter, pose, 1.0), regions)
    half_strength = denoise_once(model, *apply_control(positive, negative, adapter, pose, 0.5), 5.0)[1]
    assert torch.allclose(denoise_once(*regional, 5.0)[1], half_strength, atol=1e-5)


def test_region_adapter_weight_applies_inside_its_box_only(monkeypatch, model, clip, controlled):
    """The adapter residuals as the UNet adds them (after every wrapper, whichever slot routes)."""
    positive, negative, adapter, pose = controlled
    seen = []
    add_to_unet = openaimodel.apply_control

    def record(h, control, name):
        if name == "input" and control is not None and control.get(name) and control[name][-1] is not None:
            seen.append(control[name][-1].clone())
        return add_to_unet(h, control, name)

    monkeypatch.setattr(openaimodel, "apply_control", record)
    conditioning = apply_control(positive, negative, adapter, pose, 1.0)
    denoise_once(model, *conditioning, 5.0)
    plain = seen[:]
    seen.clear()
    denoise_once(*apply_regions(model, *conditioning, add_region(clip, "a dragon", "0, 0, 0.5, 1", adapter_weight=0)), 5.0)
    assert len(plain) == len(seen) == 4 and {r.shape[-1] for r in plain} == {8, 4, 2, 1}
    for before, after in zip(plain, seen):
        half = before.shape[-1] // 2  # columns floor(0.5 · w) lie wholly inside the box
        assert torch.equal(after[..., half:], before[..., half:])
        assert not after[..., :half].any()


# ---------------------------------------------------------------- import and errors

def test_prompt_rewrite_import_converts_row_first_pixel_boxes(clip):
    text = "[a dragon]-*-[ugly]-*-[0, 0, 72, 52]|[a knight]-*-[]-*-[]"
    regions = RegionPromptImport().import_regions(clip, text, IMAGE_W, IMAGE_H, 0.8)[0]
    assert [r.area for r in regions] == [Box(0, 0, 0.5, 1), Box.full()]
    assert [r.adapter_weight for r in regions] == [0.8, 0.8]
    direct = add_region(clip, "a dragon", negative="ugly")[0]
    assert torch.equal(regions[0].positive, direct.positive) and torch.equal(regions[0].negative, direct.negative)


@pytest.mark.parametrize("box, units, message", [
    ("0, 0, 1.5, 1", "normalized", r"box: x2 \(1.5\) must be within 0..1"),
    ("0, 0, 600, 100", "pixels", r"box: x2 \(600\) must be within 0..512 pixels"),
    ("0.5, 0, 0.5, 1", "normalized", r"box: x2 \(0.5\) must be greater than x1 \(0.5\)"),
    ("0, 0, 1", "normalized", "box: expected 4 values"),
])
def test_bad_boxes_name_the_input(clip, box, units, message):
    with pytest.raises(RegionError, match=message):
        add_region(clip, "a dragon", box, units=units)


def test_bad_masks_and_prompts_name_the_input(clip):
    with pytest.raises(RegionError, match="mask: is 32x32 but width x height is 64x64"):
        add_region(clip, "a dragon", width=64, height=64, mask=torch.ones(1, 32, 32))
    with pytest.raises(RegionError, match="mask: holds 2 masks"):
        add_region(clip, "a dragon", width=64, height=64, mask=torch.ones(2, 64, 64))
    with pytest.raises(RegionError, match="mask: is empty"):
        add_region(clip, "a dragon", width=64, height=64, mask=torch.zeros(64, 64))
    with pytest.raises(RegionError, match="prompt: is empty"):
        add_region(clip, "  ")


def test_regions_that_do_not_fit_the_latent_fail_clearly(model, clip, prompts):
    positive, negative = prompts
    latent = torch.zeros(1, 4, 8, 8)
    wide = add_region(clip, "a dragon", "0, 0, 512, 512", units="pixels", width=1024, height=512)
    with pytest.raises(RegionError, match="region 1: laid out on a 1024x512 image, but the latent is 64x64 pixels"):
        ksample(model, positive, negative, latent, regions=wide)
    tiny = add_region(clip, "a dragon", "0.5, 0.5, 0.6, 0.6")
    with pytest.raises(RegionError, match="region 1: covers no whole cell of the 8x8 latent"):
        ksample(model, positive, negative, latent, regions=tiny)


def test_region_encodings_of_the_wrong_shape_fail_clearly(model, clip, prompts):
    positive, negative = prompts
    region = add_region(clip, "a dragon")[0]
    narrow = dataclasses.replace(region, positive=region.positive[..., :512])
    with pytest.raises(RegionError, match=r"region 1: prompt encoding has shape \[1, 16, 77, 512\], expected"):
        apply_regions(model, positive, negative, (narrow,))


def test_region_caps_name_the_input(model, clip, prompts):
    positive, negative = prompts
    region = add_region(clip, "a dragon", "0, 0, 0.5, 1")[0]
    with pytest.raises(RegionError, match=f"regions: {MAX_REGIONS + 1} regions, more than the {MAX_REGIONS}"):
        apply_regions(model, positive, negative, (region,) * (MAX_REGIONS + 1))
    chunks = MAX_REGION_CHUNKS // 2 + 1
    long = dataclasses.replace(region, positive=region.positive[:, :1].repeat(1, 1, chunks, 1).expand(-1, 16, -1, -1))
    with pytest.raises(RegionError, match=f"regions: the region prompts hold {2 * chunks} chunks of 77 tokens in "
                                          f"all, more than {MAX_REGION_CHUNKS}"):
        apply_regions(model, positive, negative, (long, long))
    with pytest.raises(RegionError, match=r"negative_prompt: 65 chunks of 75 tokens, more than the 64"):
        add_region(clip, "a dragon", negative=long_prompt(75 * 65))
    too_many = MAX_REGIONS + 1
    boxes = [{"x": 0, "y": 0, "width": 8, "height": 8}] * too_many
    with pytest.raises(RegionError, match=f"bounding_box: {too_many} regions, more than the {MAX_REGIONS}"):
        RegionPrompt().add_region(clip, "a dragon", "", "", "pixels", 64, 64, 1.0, bounding_box=boxes)
    elements = [{"type": "obj", "bbox": [0, 0, 500, 500], "desc": "a dragon"}] * too_many
    with pytest.raises(RegionError, match=f"elements: {too_many} regions, more than the {MAX_REGIONS}"):
        RegionsFromBoundingBoxes().add_regions(clip, elements, "", 1.0)


def test_region_conditioning_on_an_unpatched_model_fails_clearly(model, clip, prompts):
    _, positive, negative = apply_regions(model, *prompts, add_region(clip, "a dragon", "0, 0, 0.5, 1"))
    with pytest.raises(UnroutedConditioningError, match="connect the MODEL output of 'Apply Regions'"):
        denoise_once(model, positive, negative, 5.0)


def test_a_replaced_regional_attention_fails_clearly(model, clip, prompts):
    patched, positive, negative = apply_regions(model, *prompts, add_region(clip, "a dragon", "0, 0, 0.5, 1"))
    replaced = patched.clone()
    replaced.set_model_attn2_replace(lambda q, k, v, extra: q, "input", 4, 0)
    with pytest.raises(RegionError, match="a cross-attention block ran without the regional attention of 'Apply "
                                          "Regions'"):
        denoise_once(replaced, positive, negative, 5.0)


def test_patches_are_shared_not_copied_by_clone(model, clip, prompts):
    patched = apply_regions(model, *prompts, add_region(clip, "a dragon"))[0]
    before = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    after = patched.clone().model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(before) == 16 and all(isinstance(p, RegionalAttention) and after[k] is p for k, p in before.items())
