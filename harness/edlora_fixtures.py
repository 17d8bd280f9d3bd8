"""Seeded random ED-LoRAs shaped for a given model (pure torch + the plugin's core)."""
import torch

from ..mixofshow_core.edlora_format import EDLoRA, LoRALayer, expected_embedding_shape
from ..mixofshow_core.families import SD15


def random_edlora(words, unet_shapes, text_shapes, rank=4, seed=0, name="random.safetensors",
                  lora_scale=0.5, embedding_scale=0.02, conv_layers=(), text_lora_scale=None,
                  family=SD15, granularity="block", text_shapes_2=None):
    """An ED-LoRA of `family` with distinct rows (at `granularity`) for every word and LoRA on
    the trained layers (text_lora_scale, default lora_scale: trained text-encoder LoRAs are
    usually much smaller).

    unet_shapes / text_shapes (/ text_shapes_2, SDXL's clip_g): module path -> (out, in) weight
    shape of the target model; LoRA goes on the attention linears ED-LoRA trains (plus
    `conv_layers` as 1x1 convs)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    def layer(shape, conv=False, scale=lora_scale):
        out_dim, in_dim = shape[:2]
        down, up = randn(rank, in_dim) / in_dim ** 0.5, randn(out_dim, rank) * scale / rank ** 0.5
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        return LoRALayer(down, up)

    embeddings = {w: randn(*expected_embedding_shape(family, granularity)) * embedding_scale for w in words}
    trained = {p for path in family.cross_attn_layers for p in family.unet_attention_layers(path)}
    # sorted: the host's key maps come from set iteration, whose order changes per process
    unet = {p: layer(s) for p, s in sorted(unet_shapes.items()) if p in trained}
    unet.update({p: layer(unet_shapes[p], conv=True) for p in conv_layers})
    text_scale = lora_scale if text_lora_scale is None else text_lora_scale
    text = [{p: layer(s, scale=text_scale) for p, s in sorted(shapes.items())
             if ".self_attn." in p and p in family.text_lora_layers(encoder)}
            for encoder, shapes in zip(family.encoders, (text_shapes, text_shapes_2 or {}))]
    return EDLoRA(embeddings, unet, text[0], name, family=family.name, granularity=granularity,
                  text_encoder_2=text[1] if len(text) > 1 else {})


def model_lora_shapes(model, clip, section="text_encoder"):
    """(unet_shapes, text_shapes) of a ComfyUI MODEL and CLIP in ED-LoRA module names; the text
    shapes are those of the encoder an ED-LoRA file `section` patches (SDXL: "text_encoder_2")."""
    from ..nodes.model_keys import clip_weight_keys, unet_weight_keys, weight_shapes
    unet_state, clip_state = weight_shapes(model), weight_shapes(clip.patcher)
    unet = {p: unet_state[k] for p, k in unet_weight_keys(model).items() if k in unet_state}
    text = {p: clip_state[k] for p, k in clip_weight_keys(clip, section).items() if k in clip_state}
    return unet, text
