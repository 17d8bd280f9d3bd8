"""Gradient Fuse interrupted as ComfyUI 0.38 interrupts, a BaseException from the next op, leaves
nothing behind: no hook on the input models, their weights and known concepts as they were, and
the next fusion gives exactly what an uninterrupted one gives."""
import comfy.model_management
import comfy.sample
import comfy.sd1_clip
import pytest
import torch

from comfyui_mixofshow.harness.fusion_checks import CAPTURE, loaded_weights, seeded_concepts
from comfyui_mixofshow.mixofshow_core.fusion_solver import GramAccumulator
from comfyui_mixofshow.nodes.concepts import concepts_of
from comfyui_mixofshow.nodes.gradient_fuse import fuse

from .interrupts import CurrentInterrupt, hooked_modules, press_interrupt_on_call, raise_in_every_op


def fused_weights(model, clip, concepts):
    fused_model, fused_clip, _ = fuse(model, clip, concepts, "gradient", **CAPTURE)
    weights = loaded_weights(fused_model), loaded_weights(fused_clip.patcher)
    comfy.model_management.unload_all_models()
    return weights


def base_weights(model, clip):
    comfy.model_management.unload_all_models()
    return {k: v.clone() for k, v in model.model.state_dict().items()}, \
        {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}


# The 2024 host swaps in a grown token-embedding module for the length of each text encode and
# restores it without try/finally; it never raises inside an op, so only the sampling case applies there.
SWAPS_EMBEDDINGS = hasattr(comfy.sd1_clip.SDClipModel, "set_up_textual_embeddings")


@pytest.mark.parametrize("owner, name, call", [
    pytest.param(GramAccumulator, "add", 1, id="text encoder",  # inside concept 1's text-encoder pass (stage A)
                 marks=pytest.mark.skipif(SWAPS_EMBEDDINGS, reason="the 2024 host never raises inside an op")),
    pytest.param(comfy.sample, "sample", 2, id="sampling"),  # as concept 2's capture sampling starts (stage C)
])
def test_interrupt_inside_an_op_leaves_nothing_behind(model, clip, monkeypatch, owner, name, call):
    concepts = seeded_concepts(model, clip, 2)
    expected = fused_weights(model, clip, concepts)
    before, words = base_weights(model, clip), concepts_of(clip).words
    raise_in_every_op(monkeypatch)
    with monkeypatch.context() as patch:
        calls = press_interrupt_on_call(patch, owner, name, call)
        with pytest.raises(CurrentInterrupt):
            fuse(model, clip, concepts, "gradient", **CAPTURE)
    assert len(calls) == call and not comfy.model_management.processing_interrupted()
    assert hooked_modules(model.model) == [] and hooked_modules(clip.cond_stage_model) == []
    assert concepts_of(clip).words == words
    for was, now in zip(before, base_weights(model, clip)):
        assert was.keys() == now.keys() and all(torch.equal(was[k], now[k]) for k in was)
    again = fused_weights(model, clip, concepts)
    for reference, result in zip(expected, again):
        assert all(torch.equal(reference[k], result[k]) for k in reference)
