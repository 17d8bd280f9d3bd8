"""Routes one text encoding per cross-attention layer through any stock sampler.

The per-layer encodings ride in the conditioning as model_conds[CONTEXT_KEY], a
[B, L, T, D] stack (SD1.5 [B, 16, T, 768], SDXL [B, 70, T, 2048]) that ComfyUI batches and
repeats like any model cond. A router moves the batched stack into transformer_options, and an
attn2 patch hands each cross-attention layer its own slice: layer
family.layer_index(transformer_index, block_index) (comfyui.md §3.4, mechanism A). The router is an
APPLY_MODEL wrapper where the host has the multi-slot wrapper API (so other packs' wrappers
and model function wrappers compose with it), the model function wrapper on the 2024 host.

A stack whose layers differ reaches the UNet wrapped in LayerwiseStack. Without the
router, ComfyUI's apply_model probes every extra cond's `.dtype`, and LayerwiseStack
answers that probe with a clear error instead of letting the layer-wise part be dropped.
"""
import math

import torch

from ..mixofshow_core.families import FAMILIES, SD15
from .compat import Cond, add_apply_model_wrapper
from .model_keys import model_family

CONTEXT_KEY = "edlora_ctx"
ROUTER_KEY = "mixofshow_layerwise"


class UnroutedConditioningError(RuntimeError):
    """Layer-wise conditioning reached a MODEL without the ED-LoRA routing patch."""


class LayerwiseStack:
    """A batched stack whose layers differ; only the routing wrapper may unwrap it."""

    def __init__(self, tensor):
        self.tensor = tensor

    @property
    def dtype(self):
        raise UnroutedConditioningError(
            "layer-wise ED-LoRA conditioning reached a MODEL that cannot route it: connect the MODEL "
            "output of 'EDLoRA Loader' (or another Mix-of-Show node) to the sampler, and keep it after "
            "any other model patch that replaces the model function wrapper")


class LayerwiseContext(Cond):
    """model_conds entry holding [B, L, T, D] per-layer contexts."""

    def can_concat(self, other):
        a, b = self.cond.shape, other.cond.shape
        if a[:2] != b[:2] or a[3] != b[3]:
            return False
        return math.lcm(a[2], b[2]) // min(a[2], b[2]) <= 4  # the host's CONDCrossAttn rule

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        tokens = math.lcm(*(c.shape[2] for c in conds))
        # repeating a context along the token axis leaves attention unchanged
        stack = torch.cat([c.repeat(1, 1, tokens // c.shape[2], 1) for c in conds])
        return stack if is_uniform(stack) else LayerwiseStack(stack)


def is_uniform(stack):
    return bool((stack == stack[:, :1]).all())


def context_cond(stack):
    return LayerwiseContext(stack)


def _route_stack(stack, c):
    return stack.tensor if isinstance(stack, LayerwiseStack) else stack


# Side channels the router moves from the cond dict into transformer_options:
# key -> route(value, c), which returns what the patches see and may adjust the other model
# inputs in c (the regions scale c["control"]).
ROUTES = {CONTEXT_KEY: _route_stack}


def add_route(key, route):
    ROUTES[key] = route


def routed(c):
    """The model inputs `c` with every side channel in ROUTES moved into transformer_options."""
    c = dict(c)
    moved = {key: route(c.pop(key), c) for key, route in ROUTES.items() if key in c}
    if moved:
        c["transformer_options"] = {**c.get("transformer_options", {}), **moved}
    return c


APPLY_MODEL_ARGS = ("c_concat", "c_crossattn", "control", "transformer_options")


def route_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                      **extra):
    """WrappersMP.APPLY_MODEL wrapper; passes the host's positional arguments on as it got them."""
    c = routed({"c_concat": c_concat, "c_crossattn": c_crossattn, "control": control,
                "transformer_options": transformer_options or {}, **extra})
    args = [c.pop(name) for name in APPLY_MODEL_ARGS]
    return executor(x, t, *args, **c)


class LayerwiseRouter:
    """model_function_wrapper (2024 host): routes, then calls the wrapper it replaced, if any."""

    def __init__(self, previous=None):
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args):
        c = routed(args["c"])
        if self.previous is not None:
            return self.previous(apply_model, {**args, "c": c})
        return apply_model(args["input"], args["timestep"], **c)


class LayerContextSelector:
    """attn2_patch: each cross-attention layer of `family` attends to its own encoding."""

    def __init__(self, family):
        self.family = family

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        stack = extra_options.get(CONTEXT_KEY)
        if stack is None:
            return n, context, value
        index = self.family.layer_index(extra_options["transformer_index"], extra_options.get("block_index", 0))
        if stack.shape[1] != self.family.num_cross_attn_layers:
            raise UnroutedConditioningError(
                f"model: the conditioning holds {stack.shape[1]} layer encodings, but this {self.family.name} "
                f"model has {self.family.num_cross_attn_layers} cross-attention layers; encode with the CLIP "
                f"that goes with the model")
        if stack.shape[0] != n.shape[0]:
            raise UnroutedConditioningError(
                f"conditioning: layer-wise context batch {stack.shape[0]} does not match the latent batch {n.shape[0]}")
        layer = stack[:, index].to(device=n.device, dtype=n.dtype)
        return n, layer, layer


SELECTORS = {name: LayerContextSelector(family) for name, family in FAMILIES.items()}
select_layer_context = SELECTORS[SD15.name]


def install_routing(model):
    """Adds the router and the attn2 patch of the MODEL's family to a cloned MODEL once (idempotent)."""
    options = model.model_options
    if not add_apply_model_wrapper(model, ROUTER_KEY, route_apply_model):
        wrapper = options.get("model_function_wrapper")
        if not isinstance(wrapper, LayerwiseRouter):
            model.set_model_unet_function_wrapper(LayerwiseRouter(wrapper))
    patches = options["transformer_options"].get("patches", {}).get("attn2_patch", [])
    selector = SELECTORS[model_family(model).name]
    if selector not in patches:
        model.set_model_attn2_patch(selector)
    return model
