"""Model families as data: the topology facts every stage reads instead of `if sdxl:` branches.

A `Family` describes one base-model family (SD1.5, SDXL) in the names ED-LoRA files use
(diffusers UNet paths, HF text-encoder paths) and in ComfyUI's numbering. Pure Python: nothing
here imports ComfyUI; `nodes/model_keys.py` reads MODEL/CLIP objects and calls the detectors.

Granularity. A concept word's embedding table has one row per *unit*: per transformer block
("block", SD1.5's 16 = Mix-of-Show) or per spatial transformer ("transformer", SDXL's 11); the
table's columns are the encoders' widths side by side (clip_l ‖ clip_g on SDXL, like the context).
`family.layer_rows(granularity)` expands a table to one row per layer.
SDXL's default is "transformer" (11 rows), "block" (70) stays an option: a concept prompt is
encoded (and trained through both text encoders) once per distinct row, and at SDXL's widths
the text side of a step costs 6.4x more at 70 rows, in time and in saved activations (8.2 GiB
fp16 against 1.3 GiB without gradient checkpointing; benchmarks/bench_sdxl_encode.py).

Layers. A *cross-attention layer* is one transformer block with an `attn2`; Mix-of-Show numbers
them 0..L-1 in down -> mid -> up order (SD1.5: 16, SDXL: 70). ComfyUI groups the blocks in
*spatial transformers* (SD1.5: 16 of depth 1; SDXL: 11 of depth 2 or 10) and tells an attn2 patch
where it runs through `extra_options`:
    transformer_index  the spatial transformer, counted across the UNet call (0..T-1)
    block_index        the transformer block inside it (0..depth-1)
    block              ("input", i) / ("middle", 0) / ("output", i)
so `family.layer_index(transformer_index, block_index)` is the Mix-of-Show layer.

API (instances `SD15`, `SDXL`; `FAMILIES` by name):
    family.name                         "sd15" / "sdxl"
    family.transformers                 SpatialTransformer(block, diffusers, depth) in ComfyUI order
    family.cross_attn_layers            diffusers transformer-block paths, one per layer, in layer order
    family.num_cross_attn_layers        len(cross_attn_layers)
    family.layer_index(t, b)            (transformer_index, block_index) -> layer
    family.layer_location(l)            layer -> (transformer_index, block_index)
    family.comfy_block(l)               layer -> (("input", 4), block_index), the attn2 replace key parts
    family.encoders                     Encoder(name, token_key, width, num_layers, layer, file_section,
                                        kohya_prefix) in context order; ComfyUI key prefix via
                                        encoder.comfy_prefix ("clip_l.transformer.")
    family.encoder(name)                the Encoder called name ("clip_l"/"clip_g")
    family.context_dim                  sum of encoder widths (768 / 2048)
    family.size_conditioning            True when the model takes SDXL's size/crop ADM conditioning
    family.unet_attention_layers(path)  the 8 attention linears of one transformer block
    family.unet_lora_layers()           every UNet module an ED-LoRA may carry
    family.text_lora_layers(encoder, n) every text module an ED-LoRA may carry in that encoder
    family.cross_attention_kv_layers()  attn2.to_k/to_v paths (input: the text context)
    family.num_rows(granularity)        embedding rows per concept word: "block" (one per layer) or
                                        "transformer" (one per spatial transformer); equal on SD1.5
    family.layer_rows(granularity)      for each layer, the row that feeds it
    family.default_granularity          what new ED-LoRAs of this family use
    family.cross_attention_index(path)  layer of a UNet module path, or None
    family.spatial_transformer_index(l) the spatial transformer a layer lies in
    family.comfy_attn2_paths()          ComfyUI module paths of every attn2 (detection)
    input_group(path)                   layers sharing one input Gram (family independent)
    family_of_attn2_paths(paths, width) the Family whose attn2 modules are exactly these, or None
    family_of_encoders({name: width})   the Family whose text encoders are exactly these, or None
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Encoder:
    """One text encoder. `layer` is the hidden state the UNet reads ("last" or "penultimate")."""
    name: str            # ComfyUI: cond_stage_model.<name>, state-dict root, e.g. "clip_l"
    token_key: str       # key in ComfyUI token dicts: "l" / "g"
    width: int
    num_layers: int      # layers of the full-size encoder
    layer: str
    file_section: str    # diffusers / ED-LoRA section: "text_encoder" / "text_encoder_2"
    kohya_prefix: str    # kohya LoRA key prefix: "lora_te_" / "lora_te1_" / "lora_te2_"

    @property
    def comfy_prefix(self):
        """ComfyUI state-dict prefix of the HF module paths: 'clip_l.transformer.'."""
        return f"{self.name}.transformer."


@dataclass(frozen=True)
class SpatialTransformer:
    """One ComfyUI SpatialTransformer: its UNet block, diffusers name and number of transformer blocks."""
    block: tuple         # ("input", 4), ("middle", 0), ("output", 3)
    diffusers: str       # "down_blocks.1.attentions.0"
    depth: int

    @property
    def comfy_path(self):
        """ComfyUI module path: input_blocks.<i>.1, middle_block.1, output_blocks.<i>.1."""
        kind, number = self.block
        return "middle_block.1" if kind == "middle" else f"{kind}_blocks.{number}.1"


ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
TRANSFORMER_EXTRA_LAYERS = ("proj_in", "proj_out")
BLOCK_FF_LAYERS = ("ff.net.0.proj", "ff.net.2")
TEXT_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP_LINEARS = ("fc1", "fc2")

# layers that read the same input as another one: (suffix, the first such layer's suffix)
_SAME_INPUT = ((".k_proj", ".q_proj"), (".v_proj", ".q_proj"), (".attn1.to_k", ".attn1.to_q"),
               (".attn1.to_v", ".attn1.to_q"), (".attn2.to_v", ".attn2.to_k"))


def input_group(module_path):
    """One name for the layers that read the same input (attention q/k/v of a text encoder
    and of attn1, k/v of attn2): their input Grams are equal."""
    for suffix, first in _SAME_INPUT:
        if module_path.endswith(suffix):
            return module_path[: -len(suffix)] + first
    return module_path


GRANULARITIES = ("block", "transformer")


@dataclass(frozen=True)
class Family:
    name: str
    transformers: tuple
    encoders: tuple
    size_conditioning: bool
    default_granularity: str = "block"

    @property
    def cross_attn_layers(self):
        return tuple(f"{t.diffusers}.transformer_blocks.{b}" for t in self.transformers for b in range(t.depth))

    @property
    def num_cross_attn_layers(self):
        return sum(t.depth for t in self.transformers)

    @property
    def context_dim(self):
        return sum(e.width for e in self.encoders)

    def encoder(self, name):
        for encoder in self.encoders:
            if encoder.name == name:
                return encoder
        raise KeyError(f"{self.name} has no text encoder {name!r}")

    def _starts(self):
        starts, total = [], 0
        for t in self.transformers:
            starts.append(total)
            total += t.depth
        return starts

    def layer_index(self, transformer_index, block_index=0):
        """Mix-of-Show layer of ComfyUI's (transformer_index, block_index)."""
        if not 0 <= block_index < self.transformers[transformer_index].depth:
            raise IndexError(f"{self.name}: spatial transformer {transformer_index} has no block {block_index}")
        return self._starts()[transformer_index] + block_index

    def layer_location(self, layer):
        """(transformer_index, block_index) of Mix-of-Show layer `layer`."""
        for index, (start, t) in enumerate(zip(self._starts(), self.transformers)):
            if start <= layer < start + t.depth:
                return index, layer - start
        raise IndexError(f"{self.name} has {self.num_cross_attn_layers} cross-attention layers, not {layer + 1}")

    def comfy_block(self, layer):
        """(block, block_index) of a layer: ComfyUI's attn2 replace key is (*block, block_index)."""
        transformer, block_index = self.layer_location(layer)
        return self.transformers[transformer].block, block_index

    def spatial_transformer_index(self, layer):
        return self.layer_location(layer)[0]

    def num_rows(self, granularity):
        """Embedding rows per concept word at `granularity`."""
        return max(self.layer_rows(granularity)) + 1

    def layer_rows(self, granularity):
        """For each cross-attention layer, the embedding row that feeds it."""
        if granularity == "block":
            return list(range(self.num_cross_attn_layers))
        if granularity == "transformer":
            return [self.spatial_transformer_index(layer) for layer in range(self.num_cross_attn_layers)]
        raise ValueError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")

    def unet_attention_layers(self, layer_path):
        """The 8 attention linears of one transformer block (what ED-LoRA trains)."""
        return [f"{layer_path}.{attn}.{lin}" for attn in ("attn1", "attn2") for lin in ATTENTION_LINEARS]

    def unet_lora_layers(self):
        """Every UNet module an ED-LoRA may carry (attention linears, proj and ff layers)."""
        names = []
        for t in self.transformers:
            blocks = [f"{t.diffusers}.transformer_blocks.{b}" for b in range(t.depth)]
            names += [n for path in blocks for n in self.unet_attention_layers(path)]
            names += [f"{t.diffusers}.{x}" for x in TRANSFORMER_EXTRA_LAYERS]
            names += [f"{path}.{x}" for path in blocks for x in BLOCK_FF_LAYERS]
        return names

    def text_lora_layers(self, encoder=None, num_layers=None):
        """Every module of one text encoder (default: the first) an ED-LoRA may carry."""
        encoder = self.encoders[0] if encoder is None else self.encoder(encoder) if isinstance(encoder, str) else encoder
        return [f"text_model.encoder.layers.{i}.{part}.{lin}"
                for i in range(encoder.num_layers if num_layers is None else num_layers)
                for part, lins in (("self_attn", TEXT_ATTENTION_LINEARS), ("mlp", TEXT_MLP_LINEARS))
                for lin in lins]

    def cross_attention_kv_layers(self):
        """attn2.to_k / attn2.to_v of every layer: the layers whose input is the text context."""
        return [f"{path}.attn2.{lin}" for path in self.cross_attn_layers for lin in ("to_k", "to_v")]

    def cross_attention_index(self, module_path):
        """Layer of the transformer block a UNet module path lies in, or None (proj_in/out: block 0)."""
        for t, start in zip(self.transformers, self._starts()):
            if not module_path.startswith(t.diffusers + "."):
                continue
            rest = module_path[len(t.diffusers) + 1:]
            if rest.startswith("transformer_blocks."):
                block = int(rest.split(".")[1])
                return start + block if block < t.depth else None
            return start
        return None

    def comfy_attn2_paths(self):
        """ComfyUI module path of every attn2, in layer order."""
        return [f"{t.comfy_path}.transformer_blocks.{b}.attn2" for t in self.transformers for b in range(t.depth)]


def _transformers(blocks):
    return tuple(SpatialTransformer(block, diffusers, depth) for block, diffusers, depth in blocks)


SD15 = Family(
    name="sd15",
    transformers=_transformers(
        [(("input", i), f"down_blocks.{k // 2}.attentions.{k % 2}", 1) for k, i in enumerate((1, 2, 4, 5, 7, 8))]
        + [(("middle", 0), "mid_block.attentions.0", 1)]
        + [(("output", 3 + k), f"up_blocks.{1 + k // 3}.attentions.{k % 3}", 1) for k in range(9)]),
    encoders=(Encoder("clip_l", "l", 768, 12, "last", "text_encoder", "lora_te_"),),
    size_conditioning=False,
)

SDXL = Family(
    name="sdxl",
    transformers=_transformers(
        [(("input", 4), "down_blocks.1.attentions.0", 2), (("input", 5), "down_blocks.1.attentions.1", 2),
         (("input", 7), "down_blocks.2.attentions.0", 10), (("input", 8), "down_blocks.2.attentions.1", 10),
         (("middle", 0), "mid_block.attentions.0", 10)]
        + [(("output", k), f"up_blocks.0.attentions.{k}", 10) for k in range(3)]
        + [(("output", 3 + k), f"up_blocks.1.attentions.{k}", 2) for k in range(3)]),
    encoders=(Encoder("clip_l", "l", 768, 12, "penultimate", "text_encoder", "lora_te1_"),
              Encoder("clip_g", "g", 1280, 32, "penultimate", "text_encoder_2", "lora_te2_")),
    size_conditioning=True,
    default_granularity="transformer",
)

FAMILIES = {f.name: f for f in (SD15, SDXL)}


def family_of_attn2_paths(paths, context_dim):
    """The family whose UNet has exactly these attn2 module paths (ComfyUI names) reading a
    context `context_dim` wide, or None (SD2's UNet has SD1.5's paths but a 1024-wide context)."""
    paths = sorted(paths)
    return next((f for f in FAMILIES.values()
                 if sorted(f.comfy_attn2_paths()) == paths and f.context_dim == context_dim), None)


def family_of_encoders(widths):
    """The family whose text encoders are exactly `widths` ({"clip_l": 768, ...}), or None."""
    return next((f for f in FAMILIES.values() if {e.name: e.width for e in f.encoders} == dict(widths)), None)
