"""SDXL ED-LoRAs in our .safetensors format: family and granularity in the metadata (version 2),
kohya keys for both text encoders, SD1.5 files unchanged (version 1)."""
import pytest
import torch
from safetensors.torch import save_file

from comfyui_mixofshow.mixofshow_core.edlora_format import (EDLoRA, EDLoRAFormatError, LoRALayer, load_edlora,
                                                            save_edlora, save_edlora_original)
from comfyui_mixofshow.mixofshow_core.safe_io import read_safetensors

MID = "mid_block.attentions.0.transformer_blocks.9"


def sdxl_concept(granularity, rows, seed=0, name="xl.safetensors"):
    """An SDXL ED-LoRA built by hand: LoRA on one UNet block and one layer of each encoder."""
    g = torch.Generator().manual_seed(seed)

    def lora(out_dim, in_dim, rank=4):
        return LoRALayer(torch.randn(rank, in_dim, generator=g), torch.randn(out_dim, rank, generator=g))
    unet = {f"{MID}.attn2.to_k": lora(1280, 2048), f"{MID}.attn1.to_q": lora(1280, 1280),
            "up_blocks.1.attentions.2.proj_out": lora(640, 640)}
    text = {"text_model.encoder.layers.11.self_attn.q_proj": lora(768, 768)}
    text_2 = {"text_model.encoder.layers.31.self_attn.v_proj": lora(1280, 1280)}
    embeddings = {"<x1>": torch.randn(rows, 2048, generator=g), "<x2>": torch.randn(rows, 2048, generator=g)}
    return EDLoRA(embeddings, unet, text, name, family="sdxl", granularity=granularity, text_encoder_2=text_2)


@pytest.mark.parametrize("granularity, rows", [("block", 70), ("transformer", 11)])
def test_sdxl_edlora_round_trips_with_family_and_granularity(tmp_path, granularity, rows):
    edlora = sdxl_concept(granularity, rows)
    path = str(tmp_path / "xl.safetensors")
    save_edlora(edlora, path)
    tensors, meta = read_safetensors(path)
    assert (meta["mixofshow.format_version"], meta["mixofshow.base_family"], meta["mixofshow.granularity"],
            meta["mixofshow.num_layers"], meta["mixofshow.text_dim"]) == ("2", "sdxl", granularity, str(rows), "2048")
    assert "lora_te1_text_model_encoder_layers_11_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_31_self_attn_v_proj.lora_up.weight" in tensors
    assert f"lora_unet_{MID.replace('.', '_')}_attn2_to_k.alpha" in tensors
    assert tensors["edlora_embedding.<x1>"].shape == (rows, 2048)
    again = load_edlora(path)
    assert (again.family, again.granularity, again.words) == ("sdxl", granularity, ["<x1>", "<x2>"])
    for part in ("unet", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(edlora, part), getattr(again, part)
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert torch.equal(ours[k].delta(), theirs[k].delta()), (part, k)
    assert all(torch.equal(edlora.embeddings[w], again.embeddings[w]) for w in edlora.words)


def test_transformer_rows_expand_to_the_blocks_of_their_spatial_transformer():
    edlora = sdxl_concept("transformer", 11)
    per_layer = edlora.layer_embeddings()["<x1>"]
    table = edlora.embeddings["<x1>"]
    # input 4, 5 (2 blocks each), input 7, 8, middle, output 0-2 (10 each), output 3-5 (2 each)
    assert per_layer.shape == (70, 2048)
    assert torch.equal(per_layer[0], table[0]) and torch.equal(per_layer[3], table[1])
    assert torch.equal(per_layer[4], table[2]) and torch.equal(per_layer[33], table[4])
    assert torch.equal(per_layer[34], table[5]) and torch.equal(per_layer[69], table[10])


def test_sd15_files_are_still_written_as_version_1(tmp_path):
    g = torch.Generator().manual_seed(1)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    edlora = EDLoRA({"<a>": torch.randn(16, 768, generator=g)},
                    {f"{block}.attn2.to_k": LoRALayer(torch.randn(2, 768, generator=g), torch.randn(320, 2, generator=g))},
                    {}, "a.safetensors")
    save_edlora(edlora, str(tmp_path / "a.safetensors"))
    tensors, meta = read_safetensors(str(tmp_path / "a.safetensors"))
    assert meta["mixofshow.format_version"] == "1" and "mixofshow.granularity" not in meta
    assert load_edlora(str(tmp_path / "a.safetensors")).family == "sd15"


def bad_files(tmp_path):
    good = sdxl_concept("transformer", 11)
    save_edlora(good, str(tmp_path / "good.safetensors"))
    tensors, meta = read_safetensors(str(tmp_path / "good.safetensors"))
    cases = {}
    for name, changes, message in (
            ("rows.safetensors", {"mixofshow.granularity": "block"}, "is [11, 2048], expected [70, 2048]"),
            ("grain.safetensors", {"mixofshow.granularity": "pixel"}, "granularity 'pixel' is not one of"),
            ("family.safetensors", {"mixofshow.base_family": "flux"}, "made for base model family 'flux'"),
            ("v1xl.safetensors", {"mixofshow.format_version": "1"}, "format version 1 cannot hold")):
        save_file(tensors, str(tmp_path / name), metadata={**meta, **changes})
        cases[name] = message
    sd15_named = {k.replace("lora_te1_", "lora_te_"): v for k, v in tensors.items()}
    save_file(sd15_named, str(tmp_path / "te.safetensors"), metadata=meta)
    cases["te.safetensors"] = "unknown key 'lora_te_text_model"
    return cases


def test_malformed_sdxl_files_give_one_clear_error_naming_the_file(tmp_path):
    for name, message in bad_files(tmp_path).items():
        with pytest.raises(EDLoRAFormatError) as info:
            load_edlora(str(tmp_path / name))
        assert str(info.value).startswith(name + ":") and message in str(info.value), (name, str(info.value))


def test_sdxl_edlora_has_no_original_pth_layout(tmp_path):
    with pytest.raises(EDLoRAFormatError, match=r"^xl.safetensors: the original .pth layout exists for SD1.5 only"):
        save_edlora_original(sdxl_concept("block", 70), str(tmp_path / "xl.pth"))
