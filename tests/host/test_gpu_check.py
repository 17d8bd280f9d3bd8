"""The GPU check (harness/gpu_check.py) on the CPU with its tiny preset: every check passes on the
same code path the GPU run takes, and each assertion fails on the fault it exists to catch."""
import dataclasses
from contextlib import ExitStack

import pytest
import torch

from comfyui_mixofshow.harness import gpu_check
from comfyui_mixofshow.nodes.edlora_loader import EDLoRALoader
from comfyui_mixofshow.nodes.fused_model import SaveFusedModel
from comfyui_mixofshow.nodes.regional_sampler import ApplyRegions

TINY = gpu_check.PRESETS["tiny"]


def test_every_check_passes_on_the_cpu_with_tiny_settings(tmp_path):
    lines = []
    report = gpu_check.run_checks(TINY, tmp_path, log=lines.append)
    print("\n".join(lines))
    assert report.failed == [], "\n".join(lines)
    assert report.passed == ["load", "edlora", "fusion", "save-reload", "train", "regional"]
    assert all(line.startswith("PASS") for line in lines[1:]) and len(lines) == 7


def test_expected_gram_rows_follow_the_sd15_geometry():
    settings = dataclasses.replace(TINY, capture_steps=3, capture_resolution=64)  # latent 8x8: 64, 16, 4, 1 tokens
    attn1 = "transformer_blocks.0.attn1.to_q"
    assert gpu_check.expected_rows(f"unet:down_blocks.0.attentions.1.{attn1}", 2, settings) == 2 * 3 * 64
    assert gpu_check.expected_rows(f"unet:down_blocks.2.attentions.0.{attn1}", 2, settings) == 2 * 3 * 4
    assert gpu_check.expected_rows(f"unet:mid_block.attentions.0.{attn1}", 2, settings) == 2 * 3 * 1
    assert gpu_check.expected_rows(f"unet:up_blocks.1.attentions.2.{attn1}", 2, settings) == 2 * 3 * 4
    assert gpu_check.expected_rows(f"unet:up_blocks.3.attentions.0.{attn1}", 2, settings) == 2 * 3 * 64
    assert gpu_check.expected_rows("unet:up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k", 2, settings) \
        == 2 * 2 * 77
    assert gpu_check.expected_rows("text_encoder:text_model.encoder.layers.0.self_attn.q_proj", 2, settings) \
        == 2 * 2 * 16 * 77


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny checkpoint loaded as the check loads it, with its two ED-LoRAs, in scratch folders."""
    scratch = tmp_path_factory.mktemp("gpu_check_faults")
    with ExitStack() as stack, torch.inference_mode():
        stack.enter_context(gpu_check.scratch_folders(scratch))
        stack.enter_context(gpu_check.tiny_checkpoints_detected(scratch))
        _, loaded = gpu_check.load(TINY, scratch)
        yield scratch, loaded, gpu_check.write_edloras(loaded)


@pytest.fixture(scope="module")
def fused(setup):
    _, loaded, edloras = setup
    with torch.inference_mode():
        return gpu_check.check_fusion(loaded, edloras, TINY)[1]


class UnroutedLoader(EDLoRALoader):
    """EDLoRA Loader without the per-layer context patch: every layer sees copy 0."""

    def load(self, *args):
        model, clip = super().load(*args)
        model.model_options["transformer_options"]["patches"]["attn2_patch"] = []
        return model, clip


def test_context_check_fails_when_layers_get_the_same_context(setup, monkeypatch):
    scratch, loaded, edloras = setup
    monkeypatch.setattr(gpu_check, "EDLoRALoader", UnroutedLoader)
    with pytest.raises(gpu_check.CheckFailed, match="cross-attention layer 1 received a context"):
        gpu_check.check_edlora(loaded, edloras, TINY, scratch)


def test_gram_row_check_fails_on_a_miscounted_layer(setup, fused, monkeypatch):
    _, loaded, edloras = setup
    model, clip, stats = fused
    layers = dict(stats.layers)
    name = sorted(layers)[0]
    layers[name] = dataclasses.replace(layers[name], rows=layers[name].rows + 1)

    class Miscounted:
        def fuse(self, *args):
            return model, clip, dataclasses.replace(stats, layers=layers)

    monkeypatch.setattr(gpu_check, "GradientFuse", Miscounted)
    with pytest.raises(gpu_check.CheckFailed, match=f"1 of {len(layers)} layers have other Gram row counts"):
        gpu_check.check_fusion(loaded, edloras, TINY)


def test_save_check_fails_when_the_saved_unet_lacks_the_fusion(setup, fused, monkeypatch):
    _, loaded, _ = setup

    class SavesBaseUNet(SaveFusedModel):
        def save(self, model, *args, **kwargs):
            return super().save(loaded.model, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "SaveFusedModel", SavesBaseUNet)
    with pytest.raises(gpu_check.CheckFailed, match="reloaded model's sample is .* from the one before saving"):
        gpu_check.check_save_reload(loaded, fused, TINY)


def test_train_check_fails_when_the_interrupt_does_not_stop_training(setup, monkeypatch):
    scratch, loaded, _ = setup
    monkeypatch.setattr(gpu_check.host_nodes, "interrupt_processing", lambda value=True: None)
    settings = dataclasses.replace(TINY, train_steps=2, interrupt_at=1)
    with pytest.raises(gpu_check.CheckFailed, match="did not stop when interrupted at step 1"):
        gpu_check.check_train(loaded, settings, scratch)


class LastBlockUnpatched(ApplyRegions):
    """Apply Regions whose last block (cross-attention layer 15, after which no block checks it) keeps plain attention."""

    def apply(self, *args):
        model, positive, negative = super().apply(*args)
        replace = model.model_options["transformer_options"]["patches_replace"]["attn2"]
        for key in [k for k in replace if k[:2] == ("output", 11)]:
            del replace[key]
        return model, positive, negative


def test_regional_check_fails_when_a_layer_has_no_region_patch(setup, monkeypatch):
    _, loaded, edloras = setup
    pair = EDLoRALoader().load(loaded.model, loaded.clip, edloras["a"][0], 0.7, 0.7)
    monkeypatch.setattr(gpu_check, "ApplyRegions", LastBlockUnpatched)
    with pytest.raises(gpu_check.CheckFailed,
                       match="cross-attention layer 15: the region patch changed the output in 0 of 2 steps"):
        gpu_check.check_regional(loaded, pair, TINY)
