"""Independent plain-torch re-computations on the tiny SDXL models (see reference.py for SD1.5).

Each encoder's forward is written out (pre-LN causal attention; quick-GELU for clip_l, GELU for
clip_g), the context is clip_l's ‖ clip_g's penultimate hidden state, the pooled output is
clip_g's final-layer-normed EOS row through text_projection, and the ADM vector is the pooled
output followed by sinusoidal embeddings of the size conditioning."""
import math

import torch
import torch.nn.functional as F

from .reference import BOS, EOS, cross_attention_modules

# (ComfyUI prefix, heads, activation, pad token) per encoder
ENCODERS = {"clip_l": ("clip_l.transformer.text_model.", 12, lambda h: h * torch.sigmoid(1.702 * h), EOS),
            "clip_g": ("clip_g.transformer.text_model.", 20, F.gelu, 0)}


def input_embeddings(state, encoder, tokenizer, segments, layer, columns):
    """[1, 77, width] token + position embeddings; a concept table stands in for its word with
    row `layer`, columns `columns` (this encoder's slice of the clip_l ‖ clip_g row)."""
    prefix, _, _, pad = ENCODERS[encoder]
    table = state[prefix + "embeddings.token_embedding.weight"]
    rows = [table[BOS]]
    for piece in segments:
        if isinstance(piece, str):
            rows += [table[i] for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]
        else:
            rows.append(piece[layer, columns])
    eos_at = len(rows)
    rows += [table[EOS]] + [table[pad]] * (76 - len(rows))
    x = torch.stack([row.float() for row in rows])[None]
    return x + state[prefix + "embeddings.position_embedding.weight"][:77].float(), eos_at


def encoder_forward(state, encoder, x, eos_at):
    """(penultimate hidden state [1, 77, width], final-layer-normed EOS row [1, width])."""
    prefix, heads, act, _ = ENCODERS[encoder]

    def p(name):
        return state[prefix + name].float()

    def ln(h, name):
        return F.layer_norm(h, h.shape[-1:], p(name + ".weight"), p(name + ".bias"), 1e-5)

    def linear(h, name):
        return h @ p(name + ".weight").T + p(name + ".bias")

    batch, tokens, dim = x.shape
    causal = torch.full((tokens, tokens), float("-inf")).triu(1)
    hidden, layer = [], 0
    while prefix + f"encoder.layers.{layer}.layer_norm1.weight" in state:
        pre = f"encoder.layers.{layer}."
        h = ln(x, pre + "layer_norm1")
        q, k, v = (linear(h, pre + f"self_attn.{n}_proj").view(batch, tokens, heads, -1).transpose(1, 2)
                   for n in "qkv")
        weights = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5 + causal, dim=-1)
        x = x + linear((weights @ v).transpose(1, 2).reshape(batch, tokens, dim), pre + "self_attn.out_proj")
        h = linear(ln(x, pre + "layer_norm2"), pre + "mlp.fc1")
        x = x + linear(act(h), pre + "mlp.fc2")
        hidden.append(x)
        layer += 1
    return hidden[-2], ln(x, "final_layer_norm")[:, eos_at]


def context_and_pooled(state, tokenizer, segments, layer, widths=(768, 1280)):
    """([1, 77, 2048] clip_l ‖ clip_g penultimate states, [1, 1280] projected clip_g pooled) of copy `layer`."""
    parts, pooled = [], None
    start = 0
    for encoder, width in zip(ENCODERS, widths):
        x, eos_at = input_embeddings(state, encoder, tokenizer, segments, layer, slice(start, start + width))
        hidden, eos_row = encoder_forward(state, encoder, x, eos_at)
        parts.append(hidden)
        start += width
        if encoder == "clip_g":
            pooled = eos_row @ state["clip_g.transformer.text_projection.weight"].float().T
    return torch.cat(parts, dim=-1), pooled


def sinusoid(value, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = float(value) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)])


def adm(pooled, width=768, height=768, crop_w=0, crop_h=0):
    """SDXL's ADM input: pooled ‖ embeddings of height, width, crop_h, crop_w, target height, width."""
    sizes = torch.cat([sinusoid(v) for v in (height, width, crop_h, crop_w, height, width)])
    return torch.cat([pooled, sizes.expand(pooled.shape[0], -1)], dim=1)


def forward_with_layer_contexts(unet, x, timesteps, contexts, y):
    """SDXL UNet forward where cross-attention layer l attends to contexts[l] ([B, T, 2048])."""
    handles = []
    for index, module in enumerate(cross_attention_modules(unet)):
        def swap(_module, args, kwargs, ctx=contexts[index]):
            return args, dict(kwargs, context=ctx, value=ctx)
        handles.append(module.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        return unet(x, timesteps, context=contexts[0], y=y)
    finally:
        for handle in handles:
            handle.remove()
