"""Save Fused Model / Load Fused Model on a checkpoint the host detects as SD1.5."""
import os

import comfy.model_management
import comfy.sd
import pytest
import torch

from comfyui_mixofshow.harness import models
from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.mixofshow_core.fusion_stats import FusionStats, FusionStatsError, save_fusion_stats
from comfyui_mixofshow.mixofshow_core.safe_io import file_sha256
from comfyui_mixofshow.nodes.concepts import concepts_of
from comfyui_mixofshow.nodes.edlora_concept import Concept
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise
from comfyui_mixofshow.nodes.fused_model import load_fused_checkpoint, read_concepts, save_fused_checkpoint
from comfyui_mixofshow.nodes.gradient_fuse import fuse

from .sampling import denoise_once


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    with torch.inference_mode():
        return models.write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "sd15_tiny.safetensors"))


@pytest.fixture
def fused(checkpoint):
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    concepts = [Concept(random_edlora(words, unet_shapes, text_shapes, seed=40 + i, embedding_scale=0.3,
                                      text_lora_scale=0.05, name=f"c{i}.pth"), 1.0, 1.0)
                for i, words in enumerate((["<p1>", "<p2>"], ["<q1>", "<q2>"]))]
    fused_model, fused_clip, _ = fuse(model, clip, concepts, "weight_average")
    return fused_model, fused_clip, vae


def test_saved_checkpoint_reloads_to_identical_outputs(tmp_path, fused):
    fused_model, fused_clip, vae = fused
    path = str(tmp_path / "fused.safetensors")
    save_fused_checkpoint(path, fused_model, fused_clip, vae)
    model, clip, _, stats = load_fused_checkpoint(path)
    assert stats is None
    assert concepts_of(clip).words == ["<p1>", "<p2>", "<q1>", "<q2>"]
    for word, embedding in concepts_of(fused_clip).embeddings:
        assert torch.equal(concepts_of(clip).embedding_map()[word], embedding)
    prompt = "a photo of <p1> <p2> next to <q1> <q2>"
    before = encode_layerwise(fused_clip, prompt)
    after = encode_layerwise(clip, prompt)
    assert torch.equal(before[0][1]["model_conds"]["edlora_ctx"].cond, after[0][1]["model_conds"]["edlora_ctx"].cond)
    in_memory = denoise_once(fused_model, before, before, 5.0)[1]
    reloaded = denoise_once(model, after, after, 5.0)[1]
    assert torch.equal(in_memory, reloaded)


def test_stock_loader_reads_the_fused_weights(tmp_path, fused):
    fused_model, fused_clip, vae = fused
    path = str(tmp_path / "fused.safetensors")
    save_fused_checkpoint(path, fused_model, fused_clip, vae)
    stock_model, stock_clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    assert stock_model.model.model_config.__class__.__name__ == "SD15"
    assert concepts_of(stock_clip).words == []  # the words need Load Fused Model
    comfy.model_management.load_models_gpu([fused_model])
    fused_weights = {k: v.clone() for k, v in fused_model.model.state_dict().items()}
    comfy.model_management.load_models_gpu([stock_model])
    stock_weights = stock_model.model.state_dict()
    assert all(torch.equal(fused_weights[k], stock_weights[k]) for k in fused_weights if k.startswith("diffusion_model."))


def test_statistics_sidecar_must_belong_to_the_checkpoint(tmp_path, fused):
    fused_model, fused_clip, vae = fused
    path = str(tmp_path / "fused.safetensors")
    save_fused_checkpoint(path, fused_model, fused_clip, vae,
                          FusionStats({}, [{"name": "c0.pth", "words": ["<p1>", "<p2>"]},
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
    save_fused_checkpoint(path, fused_model, fused_clip, vae)  # an overwrite without statistics drops the old ones
    assert not os.path.exists(str(tmp_path / "fused.fusionstats")) and load_fused_checkpoint(path)[3] is None


def test_plain_checkpoint_is_refused_with_a_pointer_to_the_stock_loader(checkpoint):
    with pytest.raises(ValueError, match="not a fused Mix-of-Show checkpoint .* CheckpointLoaderSimple"):
        read_concepts(checkpoint)
