"""The SDXL fixtures are the real SDXL topology as the host builds and numbers it: 70 attn2 blocks
in ComfyUI's order, a 2048-wide two-encoder context, and a checkpoint the host detects as SDXL."""
import comfy.model_base
import comfy.model_management
import comfy.sample
import comfy.supported_models
import comfy.utils
import folder_paths
import nodes
import pytest
import torch
from comfy_extras import nodes_clip_sdxl

from comfyui_mixofshow.harness import sdxl_models
from comfyui_mixofshow.mixofshow_core.families import SD15, SDXL, family_of_attn2_paths, family_of_encoders
from comfyui_mixofshow.nodes.model_keys import ModelMismatchError, clip_family, model_family, require_family

from .sdxl_fixtures import base_sdxl_clip, base_sdxl_model, sdxl_clip, sdxl_model  # noqa: F401

# ComfyUI's SDXL numbering, written out: (block, depth) per spatial transformer in call order
SDXL_TRANSFORMERS = [(("input", 4), 2), (("input", 5), 2), (("input", 7), 10), (("input", 8), 10),
                     (("middle", 0), 10), (("output", 0), 10), (("output", 1), 10), (("output", 2), 10),
                     (("output", 3), 2), (("output", 4), 2), (("output", 5), 2)]


def record_attn2_calls(model):
    """A clone whose attn2 patch records (transformer_index, block_index, block, context width)."""
    calls = []

    def record(n, context, value, extra_options):
        calls.append((extra_options["transformer_index"], extra_options["block_index"],
                      tuple(extra_options["block"]), context.shape[-1]))
        return n, context, value
    patched = model.clone()
    patched.set_model_attn2_patch(record)
    return patched, calls


def stock_sdxl_encode(clip, text, size=64):
    """The stock CLIPTextEncodeSDXL node: V1 on the 2024 host, V3 on newer hosts."""
    node = nodes_clip_sdxl.CLIPTextEncodeSDXL
    args = dict(clip=clip, width=size, height=size, crop_w=0, crop_h=0, target_width=size, target_height=size,
                text_g=text, text_l=text)
    out = node().encode(**args) if hasattr(node, "encode") else node.execute(**args).result
    return out[0]


def test_family_numbering_is_the_hosts():
    expected = [(t, b, block) for t, (block, depth) in enumerate(SDXL_TRANSFORMERS) for b in range(depth)]
    assert [(*SDXL.layer_location(layer), SDXL.comfy_block(layer)[0]) for layer in range(70)] == expected
    assert [SDXL.layer_index(t, b) for t, b, _ in expected] == list(range(70))


def test_tiny_unet_runs_70_attn2_blocks_in_family_order(sdxl_model):
    patched, calls = record_attn2_calls(sdxl_model)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(1))
    adm = torch.randn(1, 2816, generator=torch.Generator().manual_seed(2))
    patched.model.diffusion_model(x, torch.tensor([500.0]), context=context, y=adm,
                                  transformer_options=patched.model_options["transformer_options"])
    expected = [(t, b, block, 2048) for t, (block, depth) in enumerate(SDXL_TRANSFORMERS) for b in range(depth)]
    assert calls == expected
    unet = sdxl_model.model.diffusion_model
    attn2 = [name for name, _ in unet.named_modules() if name.endswith(".attn2")]
    assert attn2 == SDXL.comfy_attn2_paths()
    assert family_of_attn2_paths(attn2, 2048) is SDXL


def test_family_diffusers_names_map_to_the_hosts_modules(sdxl_model):
    """The host's own diffusers -> ldm key map sends each family layer to the attn2 it numbers."""
    mapping = comfy.utils.unet_to_diffusers(sdxl_model.model.model_config.unet_config)
    for diffusers_path, comfy_path in zip(SDXL.cross_attn_layers, SDXL.comfy_attn2_paths()):
        assert mapping[f"{diffusers_path}.attn2.to_k.weight"] == f"{comfy_path}.to_k.weight"
    weights = {k for k in sdxl_model.model.diffusion_model.state_dict()}
    for path in SDXL.unet_lora_layers():
        assert mapping[path + ".weight"] in weights


def test_tiny_clip_has_both_encoders_and_stock_encodes(sdxl_clip):
    model = sdxl_clip.cond_stage_model
    assert family_of_encoders({"clip_l": 768, "clip_g": 1280}) is SDXL
    assert [model.clip_l.transformer.get_input_embeddings().weight.shape[1],
            model.clip_g.transformer.get_input_embeddings().weight.shape[1]] == [768, 1280]
    for encoder in SDXL.encoders:
        assert all(f"{encoder.comfy_prefix}{p}.weight" in model.state_dict()
                   for p in SDXL.text_lora_layers(encoder, 3))
    (cond, extra), = stock_sdxl_encode(sdxl_clip, "a photo of a cat")
    assert cond.shape == (1, 77, 2048) and extra["pooled_output"].shape == (1, 1280)
    (plain, plain_extra), = nodes.CLIPTextEncode().encode(sdxl_clip, "a photo of a cat")[0]
    assert torch.equal(plain, cond) and torch.equal(plain_extra["pooled_output"], extra["pooled_output"])
    # clip_l's part is its penultimate hidden state, clip_g's part its own penultimate one
    tokens = sdxl_clip.tokenize("a photo of a cat")
    l_only, _ = model.clip_l.encode_token_weights(tokens["l"])
    assert torch.allclose(cond[..., :768], l_only, atol=1e-6)
    assert not torch.allclose(cond[..., 768:], torch.zeros_like(cond[..., 768:]))


def test_stock_ksampler_runs_on_the_tiny_sdxl_model(sdxl_model, sdxl_clip):
    positive = stock_sdxl_encode(sdxl_clip, "a photo of a cat")
    negative = stock_sdxl_encode(sdxl_clip, "blurry")
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    out, = nodes.common_ksampler(sdxl_model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)
    samples = out["samples"]
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all() and samples.abs().max() > 0


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory):
    """The ~2 GB file lives only while this module runs."""
    folder = tmp_path_factory.mktemp("sdxl-ckpt")
    path = folder / "tiny_sdxl.safetensors"
    with torch.inference_mode():
        sdxl_models.write_sdxl_checkpoint(str(path))
    yield folder
    path.unlink()


def test_generated_checkpoint_is_detected_as_sdxl(sdxl_checkpoint, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(sdxl_checkpoint)], {".safetensors"}))
    try:
        loaded_checkpoint_runs_as_sdxl()
    finally:  # the host keeps loaded models; free the full-size encoders for the tests that follow
        comfy.model_management.unload_all_models()


def loaded_checkpoint_runs_as_sdxl():
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sdxl.safetensors")[:3]
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    assert model_family(model) is SDXL and clip_family(clip) is SDXL
    positive = stock_sdxl_encode(clip, "a photo of a cat")
    assert positive[0][0].shape == (1, 77, 2048)
    out, = nodes.common_ksampler(model, 0, 1, 5.0, "euler", "normal", positive, stock_sdxl_encode(clip, ""),
                                 {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.isfinite(out["samples"]).all()


def test_families_are_read_from_model_and_clip(sdxl_model, sdxl_clip, model, clip):
    assert model_family(sdxl_model) is SDXL and clip_family(sdxl_clip) is SDXL
    assert model_family(model) is SD15 and clip_family(clip) is SD15
    assert require_family(sdxl_model, sdxl_clip) is SDXL
    with pytest.raises(ModelMismatchError, match=r"^clip: is sdxl but the model is sd15"):
        require_family(model, sdxl_clip, "EDLoRA Text Encode")
    with pytest.raises(ModelMismatchError, match=r"^model: is sdxl; Regional sampling needs sd15"):
        require_family(sdxl_model, what="Regional sampling", family=SD15)
