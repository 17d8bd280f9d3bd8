"""SD1.5 topology in diffusers/HF module names, the names ED-LoRA files use: the SD1.5 instance
of `families.Family` under the names the SD1.5 code has always used.

Cross-attention layer l (0..15) is the l-th `attn2` in down -> mid -> up order, the order
Mix-of-Show numbers its per-layer embeddings and ComfyUI numbers `transformer_index`.
"""
from .families import ATTENTION_LINEARS, SD15, TEXT_ATTENTION_LINEARS, TEXT_MLP_LINEARS, input_group  # noqa: F401

CROSS_ATTN_BLOCKS = tuple(t.diffusers for t in SD15.transformers)
NUM_CROSS_ATTN_LAYERS = SD15.num_cross_attn_layers
TEXT_DIM = SD15.context_dim
TEXT_LAYERS = SD15.encoders[0].num_layers

TRANSFORMER_EXTRA_LAYERS = ("proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj",
                            "transformer_blocks.0.ff.net.2")


def unet_attention_layers(block):
    """The 8 attention linears of one transformer block (what ED-LoRA trains)."""
    return SD15.unet_attention_layers(f"{block}.transformer_blocks.0")


def unet_lora_layers():
    """Every UNet module an ED-LoRA may carry (attention linears, proj and ff layers)."""
    return SD15.unet_lora_layers()


def text_lora_layers(num_layers=TEXT_LAYERS):
    """Every text-encoder module an ED-LoRA may carry (attention and MLP linears)."""
    return SD15.text_lora_layers(num_layers=num_layers)


def cross_attention_kv_layers():
    """attn2.to_k / attn2.to_v of every block: the layers whose input is the text encoding."""
    return SD15.cross_attention_kv_layers()


def cross_attention_index(module_path):
    """Layer index 0..15 of the block a UNet module path lies in, or None."""
    return SD15.cross_attention_index(module_path)
