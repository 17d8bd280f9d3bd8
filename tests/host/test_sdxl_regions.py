"""Regional sampling on SDXL: all 70 cross-attention layers rewritten, against the plain-torch
reference of the region rewrite; per-region negatives; concept words per layer."""
import nodes as comfy_nodes
import pytest
import torch

from comfyui_mixofshow.mixofshow_core.families import SDXL
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora
from comfyui_mixofshow.nodes.regional_attention import RegionalAttention
from comfyui_mixofshow.nodes.regional_sampler import apply_regions

from .sampling import denoise_once
from .sdxl_fixtures import base_sdxl_clip, base_sdxl_model, sdxl_clip, sdxl_edlora, sdxl_model  # noqa: F401
from .test_regional_sampling import (IMAGE_H, IMAGE_W, LayerRecorder, add_region, box_cells, ksample,
                                     reference_rewrite)


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


@pytest.fixture
def concept_pair(sdxl_model, sdxl_clip):
    edlora = sdxl_edlora(sdxl_model, sdxl_clip, ["<a1>", "<a2>"], "block", embedding_scale=0.5)
    return apply_edlora(sdxl_model, sdxl_clip, edlora, 0.7, 0.6)


def test_regional_attention_replaces_all_70_blocks(sdxl_model, sdxl_clip):
    positive, negative = encode(sdxl_clip, "a castle"), encode(sdxl_clip, "blurry")
    patched = apply_regions(sdxl_model, positive, negative, add_region(sdxl_clip, "a dragon", "0, 0, 0.5, 1"))[0]
    replaced = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    expected = {(*block, b) for t in SDXL.transformers for block in [t.block] for b in range(t.depth)}
    assert set(replaced) == expected and len(expected) == 70
    assert all(isinstance(p, RegionalAttention) for p in replaced.values())


# layer 1: input 5 block 1 (5 x 7 tokens); 33: middle block 9 (3 x 4); 69: output 5 block 1 (5 x 7)
@pytest.mark.parametrize("layer, grid", [(1, (5, 7)), (33, (3, 4)), (69, (5, 7))])
def test_region_rewrite_of_one_layer_matches_plain_torch_reference(concept_pair, layer, grid):
    patched_model, patched_clip = concept_pair
    positive, negative = encode(patched_clip, "a castle on a hill"), encode(patched_clip, "blurry")
    boxes = [(0, 0, 64, 72), (40, 16, 104, 72)]
    regions = add_region(patched_clip, "a photo of <a1> <a2>", ", ".join(map(str, boxes[0])), units="pixels",
                         width=IMAGE_W, height=IMAGE_H)
    regions = add_region(patched_clip, "a knight in armour", ", ".join(map(str, boxes[1])), regions=regions,
                         units="pixels", width=IMAGE_W, height=IMAGE_H)
    regional = apply_regions(patched_model, positive, negative, regions)
    with LayerRecorder(regional[0], layer) as recorder:
        ksample(*regional, torch.zeros(2, 4, 9, 13))
    x, global_context = recorder.queries[0], recorder.contexts[0][:, :77]
    assert x.shape[:2] == (2, grid[0] * grid[1])
    region_contexts = [r.positive[:, layer].expand(2, -1, -1) for r in regions]
    assert torch.equal(recorder.contexts[0][:, 77:], torch.cat(region_contexts, dim=1))
    cells = [box_cells(box, *grid) for box in boxes]
    expected = reference_rewrite(recorder.attn2, x, global_context, region_contexts, cells)
    assert torch.allclose(recorder.outputs[0].double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(regions[0].positive[:, 0], regions[0].positive[:, 69])


def test_uncond_rows_use_the_region_negative_prompts(sdxl_model, sdxl_clip):
    positive, negative = encode(sdxl_clip, "a castle"), encode(sdxl_clip, "blurry")
    box = "0.25, 0, 1, 0.75"
    full = denoise_once(*apply_regions(sdxl_model, positive, negative,
                                       add_region(sdxl_clip, "a dragon", box, negative="a knight")), 3.0)[1]
    cond = denoise_once(*apply_regions(sdxl_model, positive, positive, add_region(sdxl_clip, "a dragon", box)), 1.0)[1]
    uncond = denoise_once(*apply_regions(sdxl_model, negative, negative, add_region(sdxl_clip, "a knight", box)),
                          1.0)[1]
    assert torch.allclose(full, uncond + 3.0 * (cond - uncond), atol=1e-5)
    plain = denoise_once(*apply_regions(sdxl_model, positive, negative, add_region(sdxl_clip, "a dragon", box)), 3.0)[1]
    assert (full - plain).abs().max() > 1e-4


def test_full_image_region_with_the_global_prompt_is_plain_sampling(sdxl_model, sdxl_clip):
    positive, negative = encode(sdxl_clip, "a castle"), encode(sdxl_clip, "blurry")
    regional = apply_regions(sdxl_model, positive, negative, add_region(sdxl_clip, "a castle", negative="blurry"))
    assert torch.allclose(denoise_once(*regional, 5.0)[1], denoise_once(sdxl_model, positive, negative, 5.0)[1],
                          atol=1e-6, rtol=0)
