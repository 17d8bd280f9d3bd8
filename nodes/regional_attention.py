"""Region-aware cross-attention (Mix-of-Show's RegionT2I_AttnProcessor) under any stock sampler.

Region data rides in the conditioning like the layer-wise contexts (layerwise.py): every
conditioning dict gets model_conds[REGIONS_KEY], a RegionContexts holding each region's
layer-wise encoding [1, L, T_r, D] at its own token count (L: the model family's cross-attention
layers, 16 on SD1.5, 70 on SDXL) (region prompts on the positive
conditioning, region negatives on the negative one) and the RegionLayout shared by both.
ComfyUI repeats and batches it per row like any model cond, so each row of a UNet call carries
its own region encodings and the uncond rows attend to the region negatives by construction,
whatever cond_or_uncond holds. The layer-wise router moves the batch into transformer_options
(scaling ControlNet/T2I-Adapter residuals inside regions on the way). In every cross-attention
block, append_region_contexts (an attn2 patch) puts the layer's region encodings behind the
context, so the block the sampler actually runs projects them with its own to_k/to_v (a clone,
a deep copy, a per-device copy or the host's non-dynamic delegate alike), and RegionalAttention,
the attn2 replace patch, splits them off again and rewrites the attention output inside each
region. Each region attends to its own tokens only: nothing is padded to a token count
common to all regions.
"""
import math

import comfy.utils
import torch
import torch.nn.functional as F

from ..mixofshow_core.regions import RegionError, adapter_weight_map, region_shares, region_weights
from .compat import Cond, cross_attention, layer_grid
from .layerwise import UnroutedConditioningError, add_route

REGIONS_KEY = "mixofshow_regions"
# extra_options entry append_region_contexts leaves for RegionalAttention in the same block call
CONTEXT_TOKENS_KEY = "mixofshow_region_context_tokens"

# A region laid out on an image whose aspect ratio differs from the latent's by more than this
# (as a log ratio) would be stretched; that is refused.
ASPECT_TOLERANCE = 0.02


class RegionLayout:
    """Where the regions lie: a Box or a float mask [H, W] per region, the (width, height) each
    was laid out on (None for normalized boxes) and each region's adapter weight, for a model of
    `family` (whose layer numbering the attention patches read).

    Shared by the positive and negative conditioning and never deep-copied."""

    def __init__(self, areas, frames, adapter_weights, family):
        self.family = family
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


def layer_of(encoding, layer):
    """[B, T, D] layer `layer` of a [B, L, T, D] region encoding (L = 1: the same for every layer)."""
    return encoding[:, 0] if encoding.shape[1] == 1 else encoding[:, layer]


class RegionContexts(Cond):
    """model_conds entry: one [B, L, T_r, D] encoding per region, each with its own token count
    T_r (L = the family's cross-attention layers, or 1 when they are all equal), and the RegionLayout."""

    def __init__(self, cond, layout):
        super().__init__(tuple(cond))
        self.layout = layout

    def _copy_with(self, cond):
        return RegionContexts(cond, self.layout)

    def process_cond(self, batch_size, device=None, **kwargs):
        return self._copy_with(comfy.utils.repeat_to_batch_size(c, batch_size).to(device or c.device)
                               for c in self.cond)

    def size(self):
        first = self.cond[0]
        return [first.shape[0], sum(c.shape[2] for c in self.cond), first.shape[3]]

    def can_concat(self, other):
        return other.layout is self.layout

    def concat(self, others):
        return RegionBatch([self.cond] + [o.cond for o in others], self.layout)


class RegionBatch:
    """The region data of one UNet call: the region encodings of each conditioning entry in it
    (a run of rows), in row order. Only the layer-wise router may unwrap it.

    In every cross-attention layer the region encodings ride behind the context, region r in a
    slot of the largest T_r of any entry (zero-padded), so the running block projects them with
    its own to_k/to_v; runs[r] lists (first row, end row, tokens): which rows read how many
    tokens of slot r."""

    def __init__(self, entries, layout):
        self.entries = [tuple(entry) for entry in entries]
        self.layout = layout
        lengths = [[encoding.shape[2] for encoding in entry] for entry in self.entries]
        self.slots = [max(column) for column in zip(*lengths)]
        self.offsets = [sum(self.slots[:r]) for r in range(len(self.slots))]
        self.span = sum(self.slots)
        self.rows = sum(entry[0].shape[0] for entry in self.entries)
        self.runs = [row_runs([(entry[r].shape[0], entry[r].shape[2]) for entry in self.entries])
                     for r in range(len(self.slots))]
        # set by append_region_contexts, cleared by RegionalAttention in the same block
        self.unclaimed = False

    @property
    def dtype(self):
        raise UnroutedConditioningError(
            "regions reached a MODEL without the regional attention patch: connect the MODEL output of "
            "'Apply Regions' to the sampler, and keep it after any model patch that replaces the model "
            "function wrapper")

    def to(self, device):
        return RegionBatch([[encoding.to(device) for encoding in entry] for entry in self.entries], self.layout)

    def layer_tokens(self, layer):
        """[B, span, D]: every region's layer-`layer` encoding in its slot, rows in order."""
        rows = [torch.cat([F.pad(layer_of(encoding, layer), (0, 0, 0, slot - encoding.shape[2]))
                           for encoding, slot in zip(entry, self.slots)], dim=1)
                for entry in self.entries]
        return torch.cat(rows)


def row_runs(row_counts_and_tokens):
    """Merges consecutive (rows, tokens) pairs with equal tokens into (first row, end row, tokens) runs."""
    runs, first = [], 0
    for rows, tokens in row_counts_and_tokens:
        if runs and runs[-1][2] == tokens:
            runs[-1] = (runs[-1][0], first + rows, tokens)
        else:
            runs.append((first, first + rows, tokens))
        first += rows
    return runs


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
        return batch.to(context.device)
    return batch


add_route(REGIONS_KEY, route_regions)


def append_region_contexts(n, context, value, extra_options):
    """attn2_patch: the layer's region encodings go behind the context and the value, so the
    block that runs projects them with its own to_k/to_v (whatever copy of the model that is);
    the context length it leaves is recorded for RegionalAttention to check."""
    batch = extra_options.get(REGIONS_KEY)
    if batch is None:
        return n, context, value
    if batch.rows != context.shape[0]:
        raise RegionError(f"regions: {batch.rows} rows of region encodings for a batch of {context.shape[0]}; "
                          f"connect the conditioning from 'Apply Regions' unchanged")
    if batch.unclaimed:
        raise RegionError("regions: a cross-attention block ran without the regional attention of 'Apply Regions' "
                          "(a node applied after it replaced the attention); apply that node before 'Apply Regions'")
    layer = batch.layout.family.layer_index(extra_options["transformer_index"], extra_options.get("block_index", 0))
    regions = batch.layer_tokens(layer).to(context)
    extra_options[CONTEXT_TOKENS_KEY] = context.shape[1] + regions.shape[1]
    batch.unclaimed = True
    return n, torch.cat([context, regions], dim=1), torch.cat([value, regions.to(value)], dim=1)


class RegionalAttention:
    """attn2 replace patch of one cross-attention block.

    With region data in the call, k and v end with the region encodings' projections
    (append_region_contexts). The global output is the usual attention to the rest (or the
    block's previous replace patch on it). Each region's output is the attention of the queries
    it covers to that region's own tokens, and RegionGrid mixes them in (combine_region_outputs'
    rule): replaced inside a region, averaged where regions overlap, global outside; soft masks
    act as weights."""

    def __init__(self, previous=None):
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        batch = extra_options.get(REGIONS_KEY)
        if batch is None:
            return self.global_attention(q, k, v, extra_options)
        if extra_options.get(CONTEXT_TOKENS_KEY) != k.shape[1]:
            raise RegionError("regions: another cross-attention patch changed the context after 'Apply Regions' "
                              "added the region prompts; apply that patch to the model before 'Apply Regions'")
        batch.unclaimed = False
        split = k.shape[1] - batch.span
        out = self.global_attention(q, k[:, :split].contiguous(), v[:, :split].contiguous(), extra_options)
        h, w = layer_grid(extra_options, q.shape[1])
        grid = batch.layout.grid(extra_options["original_shape"][2:], h, w, q.device)
        region_outs = [region_attention(q[:, tokens], k[:, split:], v[:, split:], batch, r, extra_options)
                       for r, tokens, _ in grid.parts]
        return grid.mix(out, region_outs)

    def global_attention(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return cross_attention(q, k, v, extra_options["n_heads"], extra_options)


def region_attention(q, keys, values, batch, region, extra_options):
    """Attention of q [B, n, C] to region `region`'s own tokens of keys/values [B, span, C], one
    kernel call per run of rows with the same token count."""
    offset = batch.offsets[region]
    outs = [cross_attention(q[first:end], keys[first:end, offset:offset + tokens].contiguous(),
                            values[first:end, offset:offset + tokens].contiguous(), extra_options["n_heads"],
                            extra_options)
            for first, end, tokens in batch.runs[region]]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def install_regional_attention(model, family):
    """Adds append_region_contexts as an attn2 patch (after the layer-wise one, which sets the
    context) and RegionalAttention as the attn2 replace patch of every cross-attention block of
    `family` (SD1.5 16, SDXL 70) in a cloned MODEL, keeping any other replace patch as the global
    output (idempotent)."""
    transformer_options = model.model_options["transformer_options"]
    if append_region_contexts not in transformer_options.get("patches", {}).get("attn2_patch", []):
        model.set_model_attn2_patch(append_region_contexts)
    replaced = transformer_options.get("patches_replace", {}).get("attn2", {})
    for layer in range(family.num_cross_attn_layers):
        (block_name, number), block_index = family.comfy_block(layer)
        previous = replaced.get((block_name, number, block_index), replaced.get((block_name, number)))
        if not isinstance(previous, RegionalAttention):
            model.set_model_attn2_replace(RegionalAttention(previous), block_name, number, block_index)
    return model
