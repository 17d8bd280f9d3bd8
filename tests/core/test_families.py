"""Model families against the topologies written out by hand (diffusers names, ComfyUI numbering)."""
import pytest

from comfyui_mixofshow.mixofshow_core import sd15
from comfyui_mixofshow.mixofshow_core.families import (FAMILIES, SD15, SDXL, family_of_attn2_paths,
                                                       family_of_encoders, input_group)

SD15_BLOCKS = ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.1.attentions.0",
               "down_blocks.1.attentions.1", "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
               "mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
               "up_blocks.1.attentions.2", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
               "up_blocks.2.attentions.2", "up_blocks.3.attentions.0", "up_blocks.3.attentions.1",
               "up_blocks.3.attentions.2"]
SD15_COMFY = ["input_blocks.1.1", "input_blocks.2.1", "input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1",
              "input_blocks.8.1", "middle_block.1"] + [f"output_blocks.{i}.1" for i in range(3, 12)]
# (diffusers spatial transformer, ComfyUI module, depth) in ComfyUI's transformer_index order
SDXL_TRANSFORMERS = [("down_blocks.1.attentions.0", "input_blocks.4.1", 2),
                     ("down_blocks.1.attentions.1", "input_blocks.5.1", 2),
                     ("down_blocks.2.attentions.0", "input_blocks.7.1", 10),
                     ("down_blocks.2.attentions.1", "input_blocks.8.1", 10),
                     ("mid_block.attentions.0", "middle_block.1", 10),
                     ("up_blocks.0.attentions.0", "output_blocks.0.1", 10),
                     ("up_blocks.0.attentions.1", "output_blocks.1.1", 10),
                     ("up_blocks.0.attentions.2", "output_blocks.2.1", 10),
                     ("up_blocks.1.attentions.0", "output_blocks.3.1", 2),
                     ("up_blocks.1.attentions.1", "output_blocks.4.1", 2),
                     ("up_blocks.1.attentions.2", "output_blocks.5.1", 2)]


def test_sd15_family_is_the_sd15_topology():
    assert list(sd15.CROSS_ATTN_BLOCKS) == SD15_BLOCKS
    assert list(SD15.cross_attn_layers) == [f"{b}.transformer_blocks.0" for b in SD15_BLOCKS]
    assert SD15.comfy_attn2_paths() == [f"{c}.transformer_blocks.0.attn2" for c in SD15_COMFY]
    assert (SD15.num_cross_attn_layers, SD15.context_dim, sd15.TEXT_DIM, sd15.NUM_CROSS_ATTN_LAYERS) == (16, 768, 768, 16)
    assert [(e.name, e.width, e.file_section, e.kohya_prefix) for e in SD15.encoders] == [
        ("clip_l", 768, "text_encoder", "lora_te_")]
    assert not SD15.size_conditioning
    assert [SD15.layer_index(t, 0) for t in range(16)] == list(range(16))


def test_sd15_layer_lists_keep_their_names_and_order():
    block = SD15_BLOCKS[5]
    expected = [f"{block}.transformer_blocks.0.{a}.{lin}" for a in ("attn1", "attn2")
                for lin in ("to_q", "to_k", "to_v", "to_out.0")]
    assert sd15.unet_attention_layers(block) == expected
    per_block = [[f"{b}.transformer_blocks.0.{a}.{lin}" for a in ("attn1", "attn2")
                                 for lin in ("to_q", "to_k", "to_v", "to_out.0")]
                 + [f"{b}.proj_in", f"{b}.proj_out", f"{b}.transformer_blocks.0.ff.net.0.proj",
                    f"{b}.transformer_blocks.0.ff.net.2"] for b in SD15_BLOCKS]
    assert sd15.unet_lora_layers() == [name for names in per_block for name in names]
    assert sd15.text_lora_layers(1) == [f"text_model.encoder.layers.0.{p}" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    assert len(sd15.text_lora_layers()) == 72
    assert sd15.cross_attention_index(f"{SD15_BLOCKS[9]}.proj_in") == 9
    assert sd15.cross_attention_index("down_blocks.3.resnets.0.conv1") is None


def test_sdxl_layers_follow_comfyuis_numbering():
    layers = [(d, c, b) for d, c, depth in SDXL_TRANSFORMERS for b in range(depth)]
    assert SDXL.num_cross_attn_layers == len(layers) == 70
    assert list(SDXL.cross_attn_layers) == [f"{d}.transformer_blocks.{b}" for d, _, b in layers]
    assert SDXL.comfy_attn2_paths() == [f"{c}.transformer_blocks.{b}.attn2" for _, c, b in layers]
    locations = [(t, b) for t, (_, _, depth) in enumerate(SDXL_TRANSFORMERS) for b in range(depth)]
    assert [SDXL.layer_location(layer) for layer in range(70)] == locations
    assert [SDXL.layer_index(t, b) for t, b in locations] == list(range(70))
    assert SDXL.layer_index(4, 9) == 33 and SDXL.comfy_block(33) == (("middle", 0), 9)
    assert SDXL.comfy_block(69) == (("output", 5), 1)
    assert [SDXL.spatial_transformer_index(layer) for layer in (0, 3, 4, 24, 63, 64, 69)] == [0, 1, 2, 4, 7, 8, 10]
    assert (SDXL.num_rows("block"), SDXL.num_rows("transformer"), SD15.num_rows("transformer")) == (70, 11, 16)
    assert SDXL.layer_rows("transformer") == [t for t, (_, _, depth) in enumerate(SDXL_TRANSFORMERS)
                                              for _ in range(depth)]
    assert SD15.layer_rows("transformer") == SD15.layer_rows("block") == list(range(16))
    with pytest.raises(ValueError, match="granularity 'pixel'"):
        SDXL.layer_rows("pixel")
    with pytest.raises(IndexError):
        SDXL.layer_index(0, 2)
    with pytest.raises(IndexError):
        SDXL.layer_location(70)


def test_sdxl_encoders_and_layer_lists():
    assert [(e.name, e.token_key, e.width, e.num_layers, e.layer, e.file_section, e.kohya_prefix, e.comfy_prefix)
            for e in SDXL.encoders] == [
        ("clip_l", "l", 768, 12, "penultimate", "text_encoder", "lora_te1_", "clip_l.transformer."),
        ("clip_g", "g", 1280, 32, "penultimate", "text_encoder_2", "lora_te2_", "clip_g.transformer.")]
    assert SDXL.context_dim == 2048 and SDXL.size_conditioning
    assert (SDXL.default_granularity, SD15.default_granularity) == ("transformer", "block")
    assert len(SDXL.text_lora_layers("clip_g")) == 32 * 6 and len(SDXL.text_lora_layers("clip_l")) == 12 * 6
    unet = SDXL.unet_lora_layers()
    assert len(unet) == 70 * (8 + 2) + 11 * 2 and len(set(unet)) == len(unet)
    assert "mid_block.attentions.0.transformer_blocks.9.ff.net.2" in unet
    assert "up_blocks.1.attentions.2.proj_out" in unet
    kv = SDXL.cross_attention_kv_layers()
    assert len(kv) == 140 and kv[:2] == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                                         "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"]
    assert SDXL.cross_attention_index("down_blocks.2.attentions.1.transformer_blocks.7.attn2.to_v") == 14 + 7
    assert SDXL.cross_attention_index("up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q") == 65
    assert SDXL.cross_attention_index("up_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q") is None
    assert SDXL.cross_attention_index("down_blocks.0.resnets.0.conv1") is None
    assert input_group("mid_block.attentions.0.transformer_blocks.3.attn2.to_v") == \
        "mid_block.attentions.0.transformer_blocks.3.attn2.to_k"


def test_detection_reads_exact_topologies():
    assert family_of_attn2_paths(SDXL.comfy_attn2_paths()[::-1], 2048) is SDXL
    assert family_of_attn2_paths(SD15.comfy_attn2_paths(), 768) is SD15
    assert family_of_attn2_paths(SD15.comfy_attn2_paths(), 1024) is None        # SD2
    assert family_of_attn2_paths(SDXL.comfy_attn2_paths()[:-1], 2048) is None
    assert family_of_encoders({"clip_l": 768}) is SD15
    assert family_of_encoders({"clip_g": 1280, "clip_l": 768}) is SDXL
    assert family_of_encoders({"clip_g": 1280}) is None                        # SDXL refiner
    assert set(FAMILIES) == {"sd15", "sdxl"} and SDXL.encoder("clip_g").width == 1280
