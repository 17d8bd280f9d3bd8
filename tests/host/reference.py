"""Independent plain-torch re-computations used as test references.

Nothing here goes through the plugin's or ComfyUI's encode/patch paths: weights are read
from state dicts, LoRAs merged by hand, the CLIP forward written out, and per-layer UNet
contexts injected with forward pre-hooks on the attn2 modules."""
import copy

import comfy.model_management
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from comfyui_mixofshow.harness import host

BOS, EOS = 49406, 49407
CLIP_PREFIX = "clip_l.transformer.text_model."


def hf_tokenizer():
    return CLIPTokenizer.from_pretrained(str(host.host_dir() / "comfy" / "sd1_tokenizer"))


def base_state(module):
    """The module's own weights: ComfyUI patches weights in place while a model is loaded,
    so every loaded model is unloaded (restoring its backups) first."""
    comfy.model_management.unload_all_models()
    return {k: v.clone() for k, v in module.state_dict().items()}


def merged_state(state, layers, key_of, alpha):
    """state with W += alpha · up @ down for every {module path: LoRALayer}, computed by hand."""
    out = dict(state)
    for path, layer in layers.items():
        key = key_of[path]
        up = layer.up.reshape(layer.up.shape[0], -1).double()
        down = layer.down.reshape(layer.down.shape[0], -1).double()
        out[key] = (state[key].double() + alpha * layer.scale * (up @ down).reshape(state[key].shape)).to(state[key].dtype)
    return out


def input_embeddings(state, tokenizer, segments, layer):
    """[1, 77, D] token + position embeddings of a prompt given as text pieces and
    concept embedding tables ([16, D]) whose row `layer` stands in for the word."""
    table = state[CLIP_PREFIX + "embeddings.token_embedding.weight"]
    rows = [table[BOS]]
    for piece in segments:
        if isinstance(piece, str):
            rows += [table[i] for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]
        else:
            rows.append(piece[layer])
    rows += [table[EOS]] * (77 - len(rows))
    x = torch.stack(rows)[None].float()
    return x + state[CLIP_PREFIX + "embeddings.position_embedding.weight"][:77].float()


def clip_last_hidden_state(state, x, heads=12):
    """CLIP text transformer: pre-LN causal attention, quick-GELU MLP, final layer norm."""
    def p(name):
        return state[CLIP_PREFIX + name].float()

    def ln(h, name):
        return F.layer_norm(h, h.shape[-1:], p(name + ".weight"), p(name + ".bias"), 1e-5)

    def linear(h, name):
        return h @ p(name + ".weight").T + p(name + ".bias")

    batch, tokens, dim = x.shape
    causal = torch.full((tokens, tokens), float("-inf")).triu(1)
    layer = 0
    while CLIP_PREFIX + f"encoder.layers.{layer}.layer_norm1.weight" in state:
        pre = f"encoder.layers.{layer}."
        h = ln(x, pre + "layer_norm1")
        q, k, v = (linear(h, pre + f"self_attn.{n}_proj").view(batch, tokens, heads, -1).transpose(1, 2)
                   for n in "qkv")
        weights = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5 + causal, dim=-1)
        x = x + linear((weights @ v).transpose(1, 2).reshape(batch, tokens, dim), pre + "self_attn.out_proj")
        h = linear(ln(x, pre + "layer_norm2"), pre + "mlp.fc1")
        x = x + linear(h * torch.sigmoid(1.702 * h), pre + "mlp.fc2")
        layer += 1
    return ln(x, "final_layer_norm")


def reference_unet(diffusion_model, state):
    """A copy of the UNet module holding `state` (e.g. LoRA-merged weights)."""
    unet = copy.deepcopy(diffusion_model)
    unet.load_state_dict(state)
    return unet


def cross_attention_modules(unet):
    """attn2 modules in input -> middle -> output order (Mix-of-Show's layer order)."""
    return [m for name, m in unet.named_modules() if name.endswith(".attn2")]


def forward_with_layer_contexts(unet, x, timesteps, contexts):
    """UNet forward where cross-attention layer l attends to contexts[l] ([B, T, D])."""
    handles = []
    for index, module in enumerate(cross_attention_modules(unet)):
        def swap(_module, args, kwargs, ctx=contexts[index]):
            kwargs = dict(kwargs, context=ctx, value=ctx)
            return args, kwargs
        handles.append(module.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        return unet(x, timesteps, context=contexts[0])
    finally:
        for handle in handles:
            handle.remove()
