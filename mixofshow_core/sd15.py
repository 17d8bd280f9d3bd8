"""SD1.5 topology in diffusers/HF module names, the names ED-LoRA files use.

Cross-attention layer l (0..15) is the l-th `attn2` in down -> mid -> up order, the order
Mix-of-Show numbers its per-layer embeddings and ComfyUI numbers `transformer_index`.
"""

CROSS_ATTN_BLOCKS = (
    "down_blocks.0.attentions.0", "down_blocks.0.attentions.1",
    "down_blocks.1.attentions.0", "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2",
)
NUM_CROSS_ATTN_LAYERS = len(CROSS_ATTN_BLOCKS)
TEXT_DIM = 768
TEXT_LAYERS = 12

ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
TRANSFORMER_EXTRA_LAYERS = ("proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj",
                            "transformer_blocks.0.ff.net.2")
TEXT_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP_LINEARS = ("fc1", "fc2")


def unet_attention_layers(block):
    """The 8 attention linears of one transformer block (what ED-LoRA trains)."""
    return [f"{block}.transformer_blocks.0.{attn}.{lin}"
            for attn in ("attn1", "attn2") for lin in ATTENTION_LINEARS]


def unet_lora_layers():
    """Every UNet module an ED-LoRA may carry (attention linears, proj and ff layers)."""
    return [name for block in CROSS_ATTN_BLOCKS
            for name in unet_attention_layers(block) + [f"{block}.{x}" for x in TRANSFORMER_EXTRA_LAYERS]]


def text_lora_layers(num_layers=TEXT_LAYERS):
    """Every text-encoder module an ED-LoRA may carry (attention and MLP linears)."""
    return [f"text_model.encoder.layers.{i}.{part}.{lin}"
            for i in range(num_layers)
            for part, lins in (("self_attn", TEXT_ATTENTION_LINEARS), ("mlp", TEXT_MLP_LINEARS))
            for lin in lins]


def cross_attention_kv_layers():
    """attn2.to_k / attn2.to_v of every block: the layers whose input is the text encoding."""
    return [f"{block}.transformer_blocks.0.attn2.{lin}" for block in CROSS_ATTN_BLOCKS for lin in ("to_k", "to_v")]


def cross_attention_index(module_path):
    """Layer index 0..15 of the block a UNet module path lies in, or None."""
    for index, block in enumerate(CROSS_ATTN_BLOCKS):
        if module_path.startswith(block + "."):
            return index
    return None


# layers that read the same input as another one: (suffix, the first such layer's suffix)
_SAME_INPUT = ((".k_proj", ".q_proj"), (".v_proj", ".q_proj"), (".attn1.to_k", ".attn1.to_q"),
               (".attn1.to_v", ".attn1.to_q"), (".attn2.to_v", ".attn2.to_k"))


def input_group(module_path):
    """One name for the layers that read the same input (attention q/k/v of the text encoder
    and of attn1, k/v of attn2): their input Grams are equal."""
    for suffix, first in _SAME_INPUT:
        if module_path.endswith(suffix):
            return module_path[: -len(suffix)] + first
    return module_path
