"""Cross-attention maps of the concept tokens and the attention regulariser (notes §1.5).

The probe records each cross-attention layer's projected queries and keys (after any LoRA)
and recomputes the attention probabilities softmax(q kᵀ / √d) per head, as the original's
AttentionStore keeps them for training.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F


class AttentionProbe:
    """layers: [(to_q module, to_k module, heads)] of the cross-attention layers, in order."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.recording = False
        self.queries, self.keys = {}, {}

    @contextmanager
    def attached(self):
        handles = []
        try:
            for index, (to_q, to_k, _) in enumerate(self.layers):
                handles.append(to_q.register_forward_hook(self._store(self.queries, index)))
                handles.append(to_k.register_forward_hook(self._store(self.keys, index)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _store(self, table, index):
        def hook(module, args, output):
            if self.recording:
                table[index] = output
        return hook

    def start(self):
        self.queries.clear()
        self.keys.clear()
        self.recording = True

    def token_maps(self, positions):
        """{resolution r: [B, r, r, n]}: attention to the tokens at `positions` [B, n], averaged over
        every head of every layer at that resolution. Stops recording."""
        self.recording = False
        groups = {}
        for index, (_, _, heads) in enumerate(self.layers):
            probs = attention_probabilities(self.queries[index], self.keys[index], heads)
            picked = torch.gather(probs, 3, positions[:, None, None, :].expand(-1, heads, probs.shape[2], -1))
            groups.setdefault(probs.shape[2], []).append(picked)
        self.queries.clear()
        self.keys.clear()
        maps = {}
        for tokens, group in groups.items():
            side = math.isqrt(tokens)
            mean = torch.cat(group, dim=1).mean(dim=1)
            maps[side] = mean.reshape(mean.shape[0], side, side, mean.shape[-1])
        return maps


def attention_probabilities(q, k, heads):
    """[B, heads, N, T] softmax(q kᵀ / √d) of projected q [B, N, heads·d] and k [B, T, heads·d]."""
    b, n, inner = q.shape
    d = inner // heads
    q = q.float().reshape(b, n, heads, d).transpose(1, 2)
    k = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)


def attention_regularisation(maps, mask, full_identity=False):
    """Σ over resolutions of loss_subject + loss_adjective (original cal_attn_reg).

    maps: {r: [B, r, r, 2]} for (first word, second word); mask: [B, 1, h, w] concept mask.
    Each map is divided by its max over batch and space; the mask is nearest-resized to r×r.
    loss_adjective = mean of the first word's map where the mask is 0; loss_subject is the same
    for the second word, or MSE(map, mask) with full_identity. NaN when the mask has no zero."""
    total = 0.0
    for side, token_map in maps.items():
        adjective = token_map[..., 0] / token_map[..., 0].max()
        subject = token_map[..., 1] / token_map[..., 1].max()
        target = F.interpolate(mask.float(), size=(side, side), mode="nearest")[:, 0]
        outside = target == 0
        if full_identity:
            loss_subject = F.mse_loss(subject, target)
        else:
            loss_subject = subject[outside].mean()
        total = total + loss_subject + adjective[outside].mean()
    return total
