"""Region-aware cross-attention (Mix-of-Show's RegionT2I_AttnProcessor) under any stock sampler.

Region data rides in the conditioning like the layer-wise contexts (layerwise.py): every
conditioning dict gets model_conds[REGIONS_KEY], a RegionContexts holding the [1, R, 16, T, D]
layer-wise region encodings (region prompts on the positive conditioning, region negatives on
the negative one) and the RegionLayout shared by both. ComfyUI repeats and batches it per row
like any model cond, so each row of a UNet call carries its own region encodings and the
uncond rows attend to the region negatives by construction, whatever cond_or_uncond holds.
The layer-wise router moves the batch into transformer_options (scaling ControlNet/T2I-Adapter
residuals inside regions on the way), and RegionalAttention, the attn2 replace patch of every
cross-attention block, rewrites the attention output inside each region.
"""
import math

import comfy.utils
import torch

from ..mixofshow_core.regions import RegionError, adapter_weight_map, region_shares, region_weights
from .compat import Cond, cross_attention, layer_grid
from .layerwise import UnroutedConditioningError, add_route

REGIONS_KEY = "mixofshow_regions"

# SD1.5 cross-attention blocks in transformer_index order, with their attn2 module paths.
ATTN2_BLOCKS = tuple([("input", n) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0)]
                     + [("output", n) for n in range(3, 12)])
_BLOCK_PATHS = {"input": "input_blocks.{}.1", "middle": "middle_block.1", "output": "output_blocks.{}.1"}

# A region laid out on an image whose aspect ratio differs from the latent's by more than this
# (as a log ratio) would be stretched; that is refused.
ASPECT_TOLERANCE = 0.02


def attn2_path(block_name, number):
    return "diffusion_model." + _BLOCK_PATHS[block_name].format(number) + ".transformer_blocks.0.attn2"


class RegionLayout:
    """Where the regions lie: a Box or a float mask [H, W] per region, the (width, height) each
    was laid out on (None for normalized boxes) and each region's adapter weight.

    Shared by the positive and negative conditioning and never deep-copied."""

    def __init__(self, areas, frames, adapter_weights):
        self.areas = tuple(areas)
        self.frames = tuple(frames)
        self.adapter_weights = tuple(float(w) for w in adapter_weights)
        self._grids = {}
        self._adapter_maps = {}
        self._checked = set()

    def __deepcopy__(self, memo):
        return self

    def __len__(self):
        return len(self.areas)

    def grid(self, latent_hw, h, w, device):
        """The RegionGrid of an h x w token grid of a latent of size latent_hw."""
        key = (tuple(int(s) for s in latent_hw), h, w, device)
        if key not in self._grids:
            self.check_latent(key[0])
            self._grids[key] = RegionGrid(region_weights(self.areas, h, w).reshape(len(self), h * w).to(device))
        return self._grids[key]

    def check_latent(self, latent_hw):
        """Raises RegionError when a region does not fit a latent of size latent_hw."""
        if latent_hw in self._checked:
            return
        height, width = latent_hw
        for number, (frame, cells) in enumerate(zip(self.frames, region_weights(self.areas, height, width)), 1):
            if frame is not None and abs(math.log(frame[1] / frame[0] * width / height)) > ASPECT_TOLERANCE:
                raise RegionError(f"region {number}: laid out on a {frame[0]}x{frame[1]} image, but the latent is "
                                  f"{width * 8}x{height * 8} pixels; use the image size you sample at")
            if not cells.any():
                raise RegionError(f"region {number}: covers no whole cell of the {width}x{height} latent "
                                  f"(8 pixels each); make its box or mask larger")
        self._checked.add(latent_hw)

    def scales_adapters(self):
        return any(w != 1.0 for w in self.adapter_weights)

    def adapter_map(self, h, w):
        """[h, w] factor for control residuals: 1 outside, each region's weight inside (later
        regions over earlier ones, soft masks blend)."""
        if (h, w) not in self._adapter_maps:
            self._adapter_maps[h, w] = adapter_weight_map(1.0, list(zip(self.areas, self.adapter_weights)), h, w)
        return self._adapter_maps[h, w]


class RegionGrid:
    """The regions on one token grid, from their weights [R, N]: each region's support (the
    tokens it weights, as indices) with their shares of the output, and the global output's
    factor per token (combine_region_outputs' rule, evaluated on the supports only)."""

    def __init__(self, weights):
        shares, coverage = region_shares(weights)
        self.global_factor = (1 - coverage)[None, :, None]
        supports = [torch.nonzero(w > 0).flatten() for w in weights]
        # (region number, token indices, shares [1, n, 1]) of the regions present on this grid
        self.parts = [(r, tokens, shares[r, tokens][None, :, None])
                      for r, tokens in enumerate(supports) if tokens.numel()]

    def mix(self, global_out, region_outs):
        """global_out [B, N, C] with each part's region output [B, n, C] mixed in on its support."""
        out = global_out * self.global_factor.to(global_out.dtype)
        for (_, tokens, shares), region_out in zip(self.parts, region_outs):
            out.index_add_(1, tokens, region_out * shares.to(region_out.dtype))
        return out


def tokens_concatenable(a, b):
    """The host's CONDCrossAttn rule for contexts of a and b tokens."""
    return math.lcm(a, b) // min(a, b) <= 4


def repeat_tokens(contexts, tokens, axis):
    """Repeats contexts along the token axis up to `tokens`; attention to it is unchanged."""
    repeats = [1] * contexts.dim()
    repeats[axis] = tokens // contexts.shape[axis]
    return contexts.repeat(*repeats)


class RegionContexts(Cond):
    """model_conds entry: [B, R, L, T, D] region encodings and their RegionLayout."""

    def __init__(self, cond, layout):
        super().__init__(cond)
        self.layout = layout

    def _copy_with(self, cond):
        return RegionContexts(cond, self.layout)

    def can_concat(self, other):
        a, b = self.cond.shape, other.cond.shape
        return other.layout is self.layout and a[:3] == b[:3] and a[4] == b[4] and tokens_concatenable(a[3], b[3])

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        tokens = math.lcm(*(c.shape[3] for c in conds))
        return RegionBatch(torch.cat([repeat_tokens(c, tokens, 3) for c in conds]), self.layout)


class RegionBatch:
    """The region data of one UNet call; only the layer-wise router may unwrap it."""

    def __init__(self, contexts, layout):
        self.contexts = contexts
        self.layout = layout

    @property
    def dtype(self):
        raise UnroutedConditioningError(
            "regions reached a MODEL without the regional attention patch: connect the MODEL output of "
            "'Apply Regions' to the sampler, and keep it after any model patch that replaces the model "
            "function wrapper")


def scale_control(control, layout):
    """Control residuals ({"input": [...], "middle": [...], "output": [...]}, tensors [B, C, h, w] or
    None) times the layout's adapter weight map at each residual's resolution."""
    def scaled(residual):
        if not isinstance(residual, torch.Tensor) or residual.dim() != 4:
            return residual
        return residual * layout.adapter_map(*residual.shape[-2:]).to(residual)

    return {name: [scaled(r) for r in residuals] if isinstance(residuals, list) else residuals
            for name, residuals in control.items()}


def route_regions(batch, c):
    """Router hook: region encodings go to the UNet's device once per call (the current host no
    longer moves model conds) and control residuals are scaled inside the regions."""
    if batch.layout.scales_adapters() and isinstance(c.get("control"), dict):
        c["control"] = scale_control(c["control"], batch.layout)
    context = c.get("c_crossattn")
    if isinstance(context, torch.Tensor):
        return RegionBatch(batch.contexts.to(context.device), batch.layout)
    return batch


add_route(REGIONS_KEY, route_regions)


class RegionalAttention:
    """attn2 replace patch of one cross-attention block.

    The global output is the usual attention (or the block's previous replace patch). With
    region data in the call, each region's output is the attention of the queries it covers to
    that region's layer-l encoding, projected with this block's own to_k/to_v (so LoRA and
    fused weights apply), and RegionGrid mixes them in (combine_region_outputs' rule): replaced
    inside a region, averaged where regions overlap, global outside; soft masks act as weights."""

    def __init__(self, attn2, previous=None):
        self.attn2 = attn2
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = cross_attention(q, k, v, heads, extra_options)
        batch = extra_options.get(REGIONS_KEY)
        if batch is None:
            return out
        contexts = self.layer_contexts(batch.contexts, extra_options["transformer_index"], q)
        h, w = layer_grid(extra_options, q.shape[1])
        grid = batch.layout.grid(extra_options["original_shape"][2:], h, w, q.device)
        # rows are region-major: region r's keys for the batch are keys[r], [B, T, C]
        keys = self.attn2.to_k(contexts).unflatten(0, (len(batch.layout), -1))
        values = self.attn2.to_v(contexts).unflatten(0, (len(batch.layout), -1))
        region_outs = [cross_attention(q[:, tokens], keys[r], values[r], heads, extra_options)
                       for r, tokens, _ in grid.parts]
        return grid.mix(out, region_outs)

    @staticmethod
    def layer_contexts(contexts, layer, q):
        """[R * B, T, D] region encodings of cross-attention layer `layer`, region-major."""
        if contexts.shape[0] != q.shape[0]:
            raise RegionError(f"regions: {contexts.shape[0]} rows of region encodings for a batch of "
                              f"{q.shape[0]}; connect the conditioning from 'Apply Regions' unchanged")
        if layer >= contexts.shape[2]:
            raise RegionError(f"regions: cross-attention layer {layer} has no region encoding "
                              f"({contexts.shape[2]} layers); regions need an SD1.5 model")
        layer_contexts = contexts[:, :, layer].transpose(0, 1)
        return layer_contexts.reshape(-1, *layer_contexts.shape[2:]).to(device=q.device, dtype=q.dtype)


def install_regional_attention(model):
    """Sets RegionalAttention as the attn2 replace patch of every SD1.5 cross-attention block of
    a cloned MODEL, keeping any other replace patch as the global output (idempotent)."""
    replaced = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for block_name, number in ATTN2_BLOCKS:
        previous = replaced.get((block_name, number, 0), replaced.get((block_name, number)))
        if isinstance(previous, RegionalAttention):
            continue
        attn2 = comfy.utils.get_attr(model.model, attn2_path(block_name, number))
        model.set_model_attn2_replace(RegionalAttention(attn2, previous), block_name, number, 0)
    return model
