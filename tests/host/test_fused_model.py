"""Save Fused Model / Load Fused Model on a checkpoint the host detects as SD1.5.

References: the input checkpoint file (W0) and the concepts' LoRA layers, merged in plain torch
(float64) as weight averaging defines it, W0 + Σ_i ΔW_i / N."""
import os
from dataclasses import dataclass

import comfy.model_management
import comfy.sd
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_mixofshow.harness import models
from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.harness.fusion_checks import loaded_weights
from comfyui_mixofshow.mixofshow_core.fusion_stats import FusionStats, FusionStatsError, save_fusion_stats
from comfyui_mixofshow.mixofshow_core.safe_io import file_sha256
from comfyui_mixofshow.nodes.concepts import concepts_of
from comfyui_mixofshow.nodes.edlora_concept import Concept
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise
from comfyui_mixofshow.nodes.fused_model import (EMBEDDING_PREFIX, SaveFusedModel, load_fused_checkpoint,
                                                 read_concepts, save_fused_checkpoint)
from comfyui_mixofshow.nodes.gradient_fuse import fuse
from comfyui_mixofshow.nodes.model_keys import unet_weight_keys

from .sampling import denoise_once

WORDS = (["<p1>", "<p2>"], ["<q1>", "<q2>"])
PROMPT = "a photo of <p1> <p2> next to <q1> <q2>"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# Largest relative error of a fused weight: about one ulp of the precision the host holds or
# the file stores it in (rounding of the host's sum, or its stochastic rounding to fp16).
RTOL = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -20}
# The UNet, text encoder and VAE weights of an SD1.5 file (the hosts drop its sampling schedule,
# logit_scale and text_projection, which SD1.5 does not use).
WEIGHTS = ("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model.")


@dataclass
class Fused:
    model: object
    clip: object
    vae: object
    edloras: list
    unet_keys: dict


def write_checkpoint(folder, dtype):
    path = str(folder / f"sd15_tiny_{str(dtype)[6:]}.safetensors")
    save_file(models.checkpoint_state(dtype=dtype), path)
    return path


@pytest.fixture(autouse=True)
def _unload_models():
    """Each test loads full-size CLIPs; the host would keep every one of them loaded."""
    yield
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """fp16, as the usual SD1.5 files."""
    with torch.inference_mode():
        return write_checkpoint(tmp_path_factory.mktemp("ckpt"), torch.float16)


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    with torch.inference_mode():
        return write_checkpoint(tmp_path_factory.mktemp("ckpt32"), torch.float32)


def fuse_averaged(checkpoint):
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    edloras = [random_edlora(words, unet_shapes, text_shapes, seed=40 + i, embedding_scale=0.3,
                             text_lora_scale=0.05, name=f"c{i}.pth") for i, words in enumerate(WORDS)]
    fused_model, fused_clip, _ = fuse(model, clip, [Concept(e, 1.0, 1.0) for e in edloras], "weight_average")
    return Fused(fused_model, fused_clip, vae, edloras, unet_weight_keys(model))


@pytest.fixture
def fused(checkpoint):
    return fuse_averaged(checkpoint)


def held_base(base, fused):
    """W0 as the host holds it: it may keep weights in another precision than the file's (the
    text encoder in fp16 on the CPU)."""
    parts = (("model.", "", fused.model.model), ("cond_stage_model.", "clip_l.", fused.clip.cond_stage_model),
             ("first_stage_model.", "", fused.vae.first_stage_model))
    held = {file_prefix + k[len(prefix):]: v.dtype for file_prefix, prefix, module in parts
            for k, v in module.state_dict().items() if k.startswith(prefix)}
    return {k: v.to(held[k]) for k, v in base.items() if k.startswith(WEIGHTS)}


def averaged_reference(held, fused):
    """{checkpoint key: W0 + Σ_i ΔW_i / N in float64} on every fused layer."""
    def file_key(part, path):
        if part == "unet":
            return "model." + fused.unet_keys[path]
        return f"cond_stage_model.transformer.{path}.weight"

    expected = {}
    for part in ("unet", "text_encoder"):
        for path in getattr(fused.edloras[0], part):
            key = file_key(part, path)
            layers = [getattr(e, part)[path] for e in fused.edloras]
            deltas = [l.scale * (l.up.reshape(l.up.shape[0], -1).double() @ l.down.reshape(l.down.shape[0], -1).double())
                      for l in layers]
            expected[key] = held[key].double() + (sum(deltas) / len(deltas)).reshape(held[key].shape)
    return expected


def save(tmp_path, fused, **kwargs):
    path = str(tmp_path / "fused.safetensors")
    save_fused_checkpoint(path, fused.model, fused.clip, fused.vae, **kwargs)
    return path


def assert_weights(saved, checkpoint, fused, dtype):
    """Every input weight is in the file in `dtype`; fused layers hold W0 + ΔW, the others W0."""
    held = held_base(load_file(checkpoint), fused)
    expected = averaged_reference(held, fused)
    assert set(held) <= set(saved)
    assert {k.split(".")[0] for k in expected} == {"model", "cond_stage_model"}  # UNet and text encoder
    for key, w0 in held.items():
        assert saved[key].dtype == (dtype if w0.dtype in FLOATS else w0.dtype), key
        if key in expected:
            rtol = max(RTOL[dtype], RTOL[w0.dtype])
            # the unfused weight would fail this check: the change is far above the tolerance
            assert not torch.allclose(w0.double(), expected[key], rtol=4 * rtol, atol=0), key
            torch.testing.assert_close(saved[key].double(), expected[key], rtol=rtol, atol=1e-7, msg=key)
        else:
            assert torch.equal(saved[key], w0.to(saved[key].dtype)), key


def test_default_dtype_is_the_fp16_input_and_holds_the_fused_weights(tmp_path, fused, checkpoint):
    saved = load_file(save(tmp_path, fused))
    assert_weights(saved, checkpoint, fused, torch.float16)
    assert {k for k in saved if k.startswith(EMBEDDING_PREFIX)} == {EMBEDDING_PREFIX + w for ws in WORDS for w in ws}


def test_default_dtype_of_an_fp32_input_is_fp32(tmp_path, fp32_checkpoint):
    fused = fuse_averaged(fp32_checkpoint)
    assert_weights(load_file(save(tmp_path, fused)), fp32_checkpoint, fused, torch.float32)


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_explicit_dtype_is_honoured(tmp_path, fused, checkpoint, name, dtype):
    assert_weights(load_file(save(tmp_path, fused, dtype=name)), checkpoint, fused, dtype)


def test_unknown_dtype_is_refused_naming_the_input(tmp_path, fused):
    with pytest.raises(ValueError, match="dtype: 'fp8' is not one of default, fp16, bf16, fp32"):
        save(tmp_path, fused, dtype="fp8")
    assert not os.listdir(tmp_path)


def test_file_equals_the_hosts_own_save_checkpoint(tmp_path, fused):
    """Same tensors as comfy.sd.save_checkpoint writes from the same MODEL, CLIP and VAE."""
    ours = load_file(save(tmp_path, fused, dtype="fp32"))
    host_path = str(tmp_path / "host.safetensors")
    comfy.sd.save_checkpoint(host_path, fused.model, fused.clip, fused.vae)
    host = load_file(host_path)
    assert set(ours) - set(host) == {EMBEDDING_PREFIX + w for ws in WORDS for w in ws}
    for key, tensor in host.items():
        assert torch.equal(ours[key], tensor.float() if tensor.dtype in FLOATS else tensor), key


@pytest.mark.parametrize("dtype", ["fp32", "default"])
def test_reload_gives_the_in_memory_weights_and_outputs(tmp_path, fused, dtype):
    path = save(tmp_path, fused, dtype=dtype)
    stock_model, stock_clip, stock_vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True,
                                                                                  output_clip=True)
    assert stock_model.model.model_config.__class__.__name__ == "SD15"
    assert concepts_of(stock_clip).words == []  # the words need Load Fused Model
    stored = torch.float32 if dtype == "fp32" else torch.float16
    parts = ((loaded_weights(fused.model), loaded_weights(stock_model), "diffusion_model."),
             (loaded_weights(fused.clip.patcher), loaded_weights(stock_clip.patcher), "clip_l.transformer.text_model."),
             (fused.vae.first_stage_model.state_dict(), stock_vae.first_stage_model.state_dict(), ""))
    for before, after, prefix in parts:
        weights = [k for k, w in before.items() if k.startswith(prefix) and w.dtype in FLOATS]
        assert weights
        for key in weights:
            assert torch.equal(after[key], before[key].to(stored).to(after[key].dtype)), key

    model, clip, _, _ = load_fused_checkpoint(path)
    assert concepts_of(clip).words == [w for ws in WORDS for w in ws]
    for word, embedding in concepts_of(fused.clip).embeddings:
        assert torch.equal(concepts_of(clip).embedding_map()[word], embedding)
    in_memory = denoise_once(fused.model, encode_layerwise(fused.clip, PROMPT), encode_layerwise(fused.clip, PROMPT), 5.0)[1]
    reloaded = denoise_once(model, encode_layerwise(clip, PROMPT), encode_layerwise(clip, PROMPT), 5.0)[1]
    # same weights; the host's attention may chunk differently with the free memory of the moment
    relative = ((reloaded - in_memory).norm() / in_memory.norm()).item()
    assert relative < (1e-5 if dtype == "fp32" else 1e-2)


def test_save_node_defaults_to_the_input_dtype(tmp_path, fused, monkeypatch):
    import folder_paths
    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda name: [str(tmp_path)])
    SaveFusedModel().save(fused.model, fused.clip, fused.vae, "node")
    saved = load_file(str(tmp_path / "node_00001_.safetensors"))
    assert {v.dtype for k, v in saved.items() if not k.startswith(EMBEDDING_PREFIX) and v.dtype in FLOATS} == {torch.float16}
    assert SaveFusedModel.INPUT_TYPES()["optional"]["dtype"][0] == ["default", "fp16", "bf16", "fp32"]


def test_statistics_sidecar_must_belong_to_the_checkpoint(tmp_path, fused):
    path = save(tmp_path, fused, stats=FusionStats({}, [{"name": "c0.pth", "words": ["<p1>", "<p2>"]},
                                                        {"name": "c1.pth", "words": ["<q1>", "<q2>"]}]))
    assert os.path.isfile(str(tmp_path / "fused.fusionstats"))
    assert load_fused_checkpoint(path)[3].words == ["<p1>", "<p2>", "<q1>", "<q2>"]
    other = FusionStats({}, [{"name": "x", "words": ["<z1>"]}])
    save_fusion_stats(other, str(tmp_path / "fused.fusionstats"), file_sha256(path))
    with pytest.raises(FusionStatsError, match=r"fused.fusionstats: its concepts \['<z1>'\] are not the checkpoint's"):
        load_fused_checkpoint(path)
    save_fusion_stats(other, str(tmp_path / "fused.fusionstats"))  # as versions without the hash wrote it
    with pytest.raises(FusionStatsError, match=r"fused.fusionstats: not saved with this checkpoint .*hash is missing"):
        load_fused_checkpoint(path)
    save(tmp_path, fused)  # an overwrite without statistics drops the old ones
    assert not os.path.exists(str(tmp_path / "fused.fusionstats")) and load_fused_checkpoint(path)[3] is None


def test_plain_checkpoint_is_refused_with_a_pointer_to_the_stock_loader(checkpoint):
    with pytest.raises(ValueError, match="not a fused Mix-of-Show checkpoint .* CheckpointLoaderSimple"):
        read_concepts(checkpoint)
