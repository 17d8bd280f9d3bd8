"""EDLoRA Loader: merged weights, both file formats, key mapping and clear errors."""
import os

import comfy.model_management
import folder_paths
import pytest
import torch

from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.mixofshow_core import sd15
from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora, save_edlora, save_edlora_original
from comfyui_mixofshow.nodes.concepts import ConceptCollisionError, concepts_of
from comfyui_mixofshow.nodes.edlora_loader import EDLoRALoader, apply_edlora
from comfyui_mixofshow.nodes.model_keys import ModelMismatchError

from . import reference

# ComfyUI (ldm) names of the layers an ED-LoRA's diffusers names must map to, written out by hand.
EXPECTED_UNET_KEYS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0": "input_blocks.8.1.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": "middle_block.1.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "output_blocks.3.1.transformer_blocks.0.attn1.to_q",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0": "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0",
}


@pytest.fixture
def concept(model, clip):
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    return random_edlora(["<x1>", "<x2>"], unet_shapes, text_shapes, seed=5,
                         conv_layers=[f"{sd15.CROSS_ATTN_BLOCKS[3]}.proj_in"])


def loaded_weights(patcher):
    """Weights as the host computes them when it loads the patched model."""
    comfy.model_management.load_models_gpu([patcher])
    return {k: v.clone() for k, v in patcher.model.state_dict().items()}


def test_unet_weights_equal_w_plus_alpha_up_down_in_host_names(model, clip, concept):
    base = reference.base_state(model.model)
    patched_model, _ = apply_edlora(model, clip, concept, 0.8, 0.3)
    merged = loaded_weights(patched_model)
    assert len(concept.unet) == 16 * 8 + 1
    for path, host_name in EXPECTED_UNET_KEYS.items():
        key = f"diffusion_model.{host_name}.weight"
        layer = concept.unet[path]
        expected = base[key].double() + 0.8 * layer.up.double() @ layer.down.double()
        assert torch.allclose(merged[key].double(), expected, atol=1e-5), path
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert len(changed) == len(concept.unet)


def test_every_layer_including_1x1_conv_is_merged(model, clip, concept):
    base = reference.base_state(model.model)
    patched_model, _ = apply_edlora(model, clip, concept, 0.8, 0.3)
    merged = loaded_weights(patched_model)
    conv_key = "diffusion_model.input_blocks.5.1.proj_in.weight"
    layer = concept.unet[f"{sd15.CROSS_ATTN_BLOCKS[3]}.proj_in"]
    expected = base[conv_key].double() + 0.8 * (layer.up[:, :, 0, 0].double() @ layer.down[:, :, 0, 0].double())[:, :, None, None]
    assert merged[conv_key].shape[2:] == (1, 1)
    assert torch.allclose(merged[conv_key].double(), expected, atol=1e-5)


def test_text_encoder_weights_and_registered_words(model, clip, concept):
    base = reference.base_state(clip.cond_stage_model)
    _, patched_clip = apply_edlora(model, clip, concept, 0.8, 0.3)
    merged = loaded_weights(patched_clip.patcher)
    layer = concept.text_encoder["text_model.encoder.layers.1.self_attn.v_proj"]
    key = "clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight"
    expected = base[key].double() + 0.3 * layer.up.double() @ layer.down.double()
    # the host keeps CPU text encoders in fp16: compare to within one fp16 ulp (relative 2^-10)
    assert merged[key].dtype == torch.float16
    assert torch.allclose(merged[key].double(), expected, rtol=2 ** -10, atol=1e-6)
    assert concepts_of(patched_clip).words == ["<x1>", "<x2>"]
    assert concepts_of(clip).words == []  # the input CLIP is untouched
    assert concepts_of(patched_clip.clone()).words == ["<x1>", "<x2>"]  # survives stock-node clones


def test_original_pth_and_safetensors_give_identical_patches(tmp_path, model, clip, concept):
    save_edlora_original(concept, str(tmp_path / "c.pth"))
    save_edlora(concept, str(tmp_path / "c.safetensors"))
    from_pth = loaded_weights(apply_edlora(model, clip, load_edlora(str(tmp_path / "c.pth")), 0.7, 0.7)[0])
    from_st = loaded_weights(apply_edlora(model, clip, load_edlora(str(tmp_path / "c.safetensors")), 0.7, 0.7)[0])
    assert all(torch.equal(from_pth[k], from_st[k]) for k in from_pth)


def test_chained_loaders_add_their_deltas(model, clip, concept):
    base = reference.base_state(model.model)
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    other = random_edlora(["<y1>", "<y2>"], unet_shapes, text_shapes, seed=9)
    m1, c1 = apply_edlora(model, clip, concept, 0.5, 0.5)
    m2, c2 = apply_edlora(m1, c1, other, 0.25, 0.5)
    merged = loaded_weights(m2)
    path = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    expected = base[key].double() + 0.5 * concept.unet[path].delta(1.0, torch.float64) + 0.25 * other.unet[path].delta(1.0, torch.float64)
    assert torch.allclose(merged[key].double(), expected, atol=1e-5)
    assert concepts_of(c2).words == ["<x1>", "<x2>", "<y1>", "<y2>"]


def test_same_words_twice_is_a_clear_error(model, clip, concept):
    m1, c1 = apply_edlora(model, clip, concept, 0.5, 0.5)
    with pytest.raises(ConceptCollisionError, match="word <x1> is already provided by random.safetensors"):
        apply_edlora(m1, c1, concept, 0.5, 0.5)


def test_edlora_for_another_base_model_is_refused(model, clip):
    _, text_shapes = model_lora_shapes(model, clip)
    sd15_shapes = {f"{sd15.CROSS_ATTN_BLOCKS[0]}.transformer_blocks.0.attn1.to_q": (320, 320)}
    wrong = random_edlora(["<z1>"], sd15_shapes, text_shapes, name="real_sd15.safetensors")
    with pytest.raises(ModelMismatchError, match=r"real_sd15.safetensors: unet layer down_blocks.0.attentions.0"
                                                 r".transformer_blocks.0.attn1.to_q is \[320, 320\] in the file "
                                                 r"but \[32, 32\] in the model"):
        apply_edlora(model, clip, wrong, 0.7, 0.7)


def test_text_layer_missing_from_the_model_is_refused(model, clip):
    unet_shapes, _ = model_lora_shapes(model, clip)
    deep = {"text_model.encoder.layers.11.self_attn.q_proj": (768, 768)}
    wrong = random_edlora(["<z1>"], unet_shapes, deep, name="deep.pth")
    with pytest.raises(ModelMismatchError, match="deep.pth: text_encoder layer text_model.encoder.layers.11"
                                                 ".self_attn.q_proj does not exist in this model"):
        apply_edlora(model, clip, wrong, 0.7, 0.7)


def test_loader_node_reads_models_edlora_and_tracks_changes(tmp_path, model, clip, concept):
    folder = tmp_path / "edlora"
    folder.mkdir()
    folder_paths.add_model_folder_path("edlora", str(folder))
    save_edlora(concept, str(folder / "concept.safetensors"))
    assert "concept.safetensors" in EDLoRALoader.INPUT_TYPES()["required"]["edlora_name"][0]
    before = EDLoRALoader.IS_CHANGED("concept.safetensors")
    patched_model, patched_clip = EDLoRALoader().load(model, clip, "concept.safetensors", 0.7, 0.7)
    assert concepts_of(patched_clip).words == ["<x1>", "<x2>"]
    os.utime(folder / "concept.safetensors", ns=(1, 1))
    assert EDLoRALoader.IS_CHANGED("concept.safetensors") != before
    with pytest.raises(FileNotFoundError, match="edlora_name: missing.pth is not in models/edlora"):
        EDLoRALoader().load(model, clip, "missing.pth", 0.7, 0.7)
