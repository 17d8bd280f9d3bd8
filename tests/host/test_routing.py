"""The layer-wise router takes the host's wrapper slot and composes with other packs' wrappers.

Current hosts (v0.3.64, 0.38): a WrappersMP.APPLY_MODEL wrapper under its own key, so another
pack's APPLY_MODEL wrapper and a model_function_wrapper set before or after ours all run. The
2024 host has only the model_function_wrapper slot: a wrapper set before ours is chained."""
import pytest
import torch

from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.nodes.compat import IS_CURRENT_HOST
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise
from comfyui_mixofshow.nodes.layerwise import (CONTEXT_KEY, ROUTER_KEY, LayerwiseRouter, install_routing,
                                               route_apply_model)

from . import reference
from .sampling import denoise_once

PROMPT = "a photo of <a1> <a2> smiling"


@pytest.fixture
def concept(model, clip):
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    return random_edlora(["<a1>", "<a2>"], unet_shapes, text_shapes, seed=3, embedding_scale=0.5)


def apply_model_slot():
    import comfy.patcher_extension
    return comfy.patcher_extension.WrappersMP.APPLY_MODEL


def layer_inputs(model, cond):
    """{layer: the context cross-attention layer l projects} in one denoising step."""
    seen = {}
    layers = reference.cross_attention_modules(model.model.diffusion_model)
    handles = [m.to_k.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, args[0].clone()))
               for i, m in enumerate(layers)]
    try:
        denoise_once(model, cond, cond, 1.0)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_router_takes_the_hosts_wrapper_slot_once(model):
    routed = install_routing(install_routing(model.clone()))
    if IS_CURRENT_HOST:
        assert routed.get_wrappers(apply_model_slot(), ROUTER_KEY) == [route_apply_model]
        assert "model_function_wrapper" not in routed.model_options
    else:
        router = routed.model_options["model_function_wrapper"]
        assert isinstance(router, LayerwiseRouter) and router.previous is None


def test_other_packs_wrappers_run_together_with_the_router(model, clip, concept):
    calls = []

    def function_wrapper(name):
        def wrapper(apply_model, args):
            calls.append(name)
            return apply_model(args["input"], args["timestep"], **args["c"])
        return wrapper

    def apply_model_wrapper(executor, *args, **kwargs):
        calls.append("apply_model wrapper")
        return executor(*args, **kwargs)

    base = model.clone()
    base.set_model_unet_function_wrapper(function_wrapper("function wrapper before"))
    expected = ["function wrapper before"]
    if IS_CURRENT_HOST:
        base.add_wrapper_with_key(apply_model_slot(), "another_pack", apply_model_wrapper)
    patched_model, patched_clip = apply_edlora(base, clip, concept, 0.7, 0.6)
    if IS_CURRENT_HOST:
        # on these hosts the slot is not ours: a wrapper set afterwards replaces only the earlier one
        patched_model.set_model_unet_function_wrapper(function_wrapper("function wrapper after"))
        expected = ["function wrapper after", "apply_model wrapper"]

    cond = encode_layerwise(patched_clip, PROMPT)
    seen = layer_inputs(patched_model, cond)
    stack = cond[0][1]["model_conds"][CONTEXT_KEY].cond
    assert calls == expected
    assert len(seen) == 16
    for layer in range(16):
        assert torch.equal(seen[layer], stack[:, layer].to(seen[layer].dtype)), layer
    assert not torch.equal(stack[:, 0], stack[:, 15]), "layers must differ for this test to mean anything"
