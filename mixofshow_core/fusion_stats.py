"""Saved fusion statistics: the per-layer sums that make gradient fusion incremental.

For every fused layer the file keeps LayerStats (G = Σ G_i, R = Σ ΔW_i G_i, c, rows) summed over
the fused concepts, so fusing one more concept only needs that concept's capture. Layer names
are "text_encoder:<HF path>" or "unet:<diffusers path>". Metadata records the concepts (words,
alphas, source file), the solver tolerance and the format version.

Format 2 (written) stores the same numbers losslessly in about a sixth of format 1's bytes:
  - each distinct Gram once (layers reading one input, e.g. attention q/k/v, have equal Grams),
    as its lower triangle (the eigendecomposition reads only that triangle; the upper one is
    restored by symmetry), float64: "gram|<n>" [d_in (d_in + 1) / 2], and the metadata
    mixofshow.grams = JSON {layer: n};
  - R as the concepts' low-rank products when that is smaller (R = Σ left_i right_i, e.g. a LoRA
    concept's (α·up, down G_i)): "<layer>|rhs_left" [d_out, Σr], "<layer>|rhs_right" [Σr, d_in]
    and "<layer>|rhs_ranks" [r_1, r_2, ...], summed back in the order they were added (the same
    float64 sum the fusion solved); otherwise dense "<layer>|rhs";
  - "<layer>|energy", "<layer>|rows".
Format 1 (read only): "<layer>|gram", "|rhs", "|energy", "|rows", all dense float64.

    mixofshow.format = "fusion_stats", mixofshow.format_version = "2",
    mixofshow.concepts = JSON list of {"name", "words", "unet_alpha", "text_encoder_alpha"},
    mixofshow.tolerance = the solve tolerance used, or "match_lbfgs" for the rule that matches the
    original's L-BFGS objective (tolerance None), mixofshow.kv_positions = the k/v rows used,
    mixofshow.checkpoint_sha256 = SHA-256 of the fused checkpoint the file belongs to (when saved beside one)
    tensors: the layer statistics above, and each concept's cross-attention k/v LoRA
    "kv|<concept index>|<path>|up" / "|down" (α folded into up): the k/v stage only needs
    text-encoder passes, so adding a concept recomputes it for all concepts with the new fused
    text encoder instead of reusing stale sums.
"""
import json
import os
from dataclasses import dataclass, field

import torch

from .fusion_solver import LayerStats
from .safe_io import UnreadableFileError, read_safetensors, save_safetensors

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
STAT_PARTS = ("gram", "rhs", "energy", "rows")
PACKED_PARTS = ("rhs", "rhs_left", "rhs_right", "rhs_ranks", "energy", "rows")
GRAM_PREFIX = "gram|"
GRAMS_KEY = "mixofshow.grams"
KV_PREFIX = "kv|"
CHECKPOINT_HASH_KEY = "mixofshow.checkpoint_sha256"
MATCH_LBFGS = "match_lbfgs"


class FusionStatsError(ValueError):
    """A missing, corrupted or mismatched fusion statistics file."""


@dataclass
class FusionStats:
    layers: dict = field(default_factory=dict)      # layer name -> LayerStats (summed over concepts)
    concepts: list = field(default_factory=list)    # [{"name", "words", "unet_alpha", "text_encoder_alpha"}]
    tolerance: float = 1e-3    # None: the λ rule matching the original's L-BFGS objective
    kv_positions: str = "all"
    kv_loras: dict = field(default_factory=dict)    # concept index -> {path: (up, down)}, ΔW = up @ down

    @property
    def words(self):
        return [w for concept in self.concepts for w in concept["words"]]


def pack_lower(gram):
    """The lower triangle of a square matrix, row by row."""
    rows, columns = torch.tril_indices(gram.shape[0], gram.shape[0])
    return gram[rows, columns].contiguous()


def unpack_lower(packed, size):
    """The symmetric matrix whose lower triangle pack_lower returned."""
    rows, columns = torch.tril_indices(size, size)
    gram = torch.zeros(size, size, dtype=packed.dtype)
    gram[rows, columns] = packed
    gram[columns, rows] = packed
    return gram


def _distinct_grams(layers):
    """({layer: gram index}, [grams]): equal Grams (layers reading one input) stored once."""
    grams, index, seen = [], {}, {}
    for name, layer in layers.items():
        fingerprint = (tuple(layer.gram.shape), float(layer.gram.diagonal().sum()))
        for candidate in seen.get(fingerprint, []):
            if torch.equal(grams[candidate], layer.gram):
                index[name] = candidate
                break
        else:
            index[name] = len(grams)
            seen.setdefault(fingerprint, []).append(len(grams))
            grams.append(layer.gram)
    return index, grams


def _rhs_tensors(name, layer):
    factors = layer.rhs_factors
    if factors is not None and sum(l.shape[1] for l, _ in factors) * (layer.d_out + layer.d_in) < layer.d_out * layer.d_in:
        left = torch.cat([l.cpu() for l, _ in factors], 1) if factors else torch.zeros(layer.d_out, 0, dtype=torch.float64)
        right = torch.cat([r.cpu() for _, r in factors], 0) if factors else torch.zeros(0, layer.d_in, dtype=torch.float64)
        return {f"{name}|rhs_left": left.contiguous(), f"{name}|rhs_right": right.contiguous(),
                f"{name}|rhs_ranks": torch.tensor([l.shape[1] for l, _ in factors], dtype=torch.int64)}
    return {f"{name}|rhs": layer.rhs.cpu().contiguous()}


def save_fusion_stats(stats, path, checkpoint_sha256=None):
    """Writes `stats` (format 2); `checkpoint_sha256` binds the file to the checkpoint it was saved beside."""
    gram_of, grams = _distinct_grams(stats.layers)
    tensors = {f"{GRAM_PREFIX}{i}": pack_lower(gram.cpu()) for i, gram in enumerate(grams)}
    for name, layer in stats.layers.items():
        tensors.update(_rhs_tensors(name, layer))
        tensors[f"{name}|energy"] = torch.tensor([layer.energy], dtype=torch.float64)
        tensors[f"{name}|rows"] = torch.tensor([layer.rows], dtype=torch.int64)
    for index, layers in stats.kv_loras.items():
        for layer_path, (up, down) in layers.items():
            tensors[f"{KV_PREFIX}{index}|{layer_path}|up"] = up.contiguous()
            tensors[f"{KV_PREFIX}{index}|{layer_path}|down"] = down.contiguous()
    metadata = {"mixofshow.format": "fusion_stats", "mixofshow.format_version": FORMAT_VERSION,
                "mixofshow.concepts": json.dumps(stats.concepts), "mixofshow.tolerance": _tolerance_text(stats.tolerance),
                "mixofshow.kv_positions": stats.kv_positions, GRAMS_KEY: json.dumps(gram_of)}
    if checkpoint_sha256 is not None:
        metadata[CHECKPOINT_HASH_KEY] = checkpoint_sha256
    save_safetensors(tensors, path, metadata)


def load_fusion_stats(path, checkpoint_sha256=None):
    """The statistics in `path` (format 1 or 2); with `checkpoint_sha256`, only if they were saved with that checkpoint."""
    name = os.path.basename(path)
    try:
        tensors, metadata = read_safetensors(path)
    except UnreadableFileError as e:
        raise FusionStatsError(f"fusion stats {e}") from e
    if checkpoint_sha256 is not None and metadata.get(CHECKPOINT_HASH_KEY) != checkpoint_sha256:
        raise FusionStatsError(f"fusion stats {name}: not saved with this checkpoint (its recorded checkpoint hash "
                               f"is {'missing' if CHECKPOINT_HASH_KEY not in metadata else 'different'}); it "
                               f"belongs to an earlier or another fusion: delete it, or re-save the fused model")
    if metadata.get("mixofshow.format") != "fusion_stats":
        raise FusionStatsError(f"fusion stats {name}: not a Mix-of-Show fusion statistics file")
    version = metadata.get("mixofshow.format_version")
    if version not in READABLE_VERSIONS:
        raise FusionStatsError(f"fusion stats {name}: unsupported format version {version} (this version reads "
                               f"{' and '.join(READABLE_VERSIONS)})")
    try:
        concepts = json.loads(metadata["mixofshow.concepts"])
        tolerance = _tolerance_value(metadata["mixofshow.tolerance"])
        gram_of = json.loads(metadata[GRAMS_KEY]) if version == "2" else None
    except (KeyError, ValueError) as e:
        raise FusionStatsError(f"fusion stats {name}: corrupted metadata ({e})") from e
    grouped, kv_loras, grams = {}, {}, {}
    parts = STAT_PARTS if version == "1" else PACKED_PARTS
    for key, value in tensors.items():
        if key.startswith(KV_PREFIX):
            index, layer_path, part = _kv_key(name, key)
            kv_loras.setdefault(index, {}).setdefault(layer_path, {})[part] = value
            continue
        if version == "2" and key.startswith(GRAM_PREFIX):
            grams[key[len(GRAM_PREFIX):]] = value
            continue
        layer, _, part = key.rpartition("|")
        if part not in parts:
            raise FusionStatsError(f"fusion stats {name}: unknown tensor {key!r}")
        grouped.setdefault(layer, {})[part] = value
    layers, unpacked = {}, {}
    for layer, layer_parts in grouped.items():
        try:
            layers[layer] = (LayerStats.from_tensors(layer_parts) if version == "1"
                             else _packed_layer(layer_parts, grams, gram_of.get(layer), unpacked))
        except (ValueError, RuntimeError) as e:
            raise FusionStatsError(f"fusion stats {name}: layer {layer}: {e}") from e
        if not bool(layers[layer].gram.isfinite().all() and layers[layer].rhs.isfinite().all()):
            raise FusionStatsError(f"fusion stats {name}: layer {layer} contains NaN or inf")
    return FusionStats(layers, concepts, tolerance, metadata.get("mixofshow.kv_positions", "all"),
                       _kv_pairs(name, kv_loras, len(concepts)))


def _packed_layer(parts, grams, gram_index, unpacked):
    """LayerStats of one format-2 layer; layers sharing a Gram share one tensor (`unpacked`, by
    index; LayerStats loaded from a file are never changed in place)."""
    missing = {"energy", "rows"} - set(parts)
    if gram_index is None or str(gram_index) not in grams:
        raise ValueError("its Gram is missing")
    if missing or not ("rhs" in parts or {"rhs_left", "rhs_right", "rhs_ranks"} <= set(parts)):
        raise ValueError(f"incomplete statistics (has {sorted(parts)})")
    packed = grams[str(gram_index)].to(torch.float64)
    size = int(round(((8 * packed.numel() + 1) ** 0.5 - 1) / 2))
    if size * (size + 1) // 2 != packed.numel():
        raise ValueError(f"packed Gram of {packed.numel()} values is not a triangle")
    if gram_index not in unpacked:
        unpacked[gram_index] = unpack_lower(packed, size)
    gram = unpacked[gram_index]
    factors = None
    if "rhs" in parts:
        rhs = parts["rhs"].to(torch.float64)
    else:
        left, right = parts["rhs_left"].to(torch.float64), parts["rhs_right"].to(torch.float64)
        ranks = [int(r) for r in parts["rhs_ranks"].reshape(-1)]
        if sum(ranks) != left.shape[1] or sum(ranks) != right.shape[0] or right.shape[1] != size:
            raise ValueError(f"inconsistent R factors: left {tuple(left.shape)}, right {tuple(right.shape)}, ranks {ranks}")
        factors = list(zip(left.split(ranks, 1), right.split(ranks, 0)))
        rhs = torch.zeros(left.shape[0], size, dtype=torch.float64)
        for factor_left, factor_right in factors:
            rhs += factor_left @ factor_right
    if rhs.dim() != 2 or rhs.shape[1] != size:
        raise ValueError(f"inconsistent stats shapes: gram [{size}, {size}], rhs {tuple(rhs.shape)}")
    return LayerStats(gram, rhs, float(parts["energy"].reshape(-1)[0]), int(parts["rows"].reshape(-1)[0]), factors)


def _tolerance_text(tolerance):
    return MATCH_LBFGS if tolerance is None else repr(tolerance)


def _tolerance_value(text):
    return None if text == MATCH_LBFGS else float(text)


def _kv_key(name, key):
    parts = key.split("|")
    if len(parts) != 4 or not parts[1].isdigit() or parts[3] not in ("up", "down"):
        raise FusionStatsError(f"fusion stats {name}: malformed k/v LoRA key {key!r}")
    return int(parts[1]), parts[2], parts[3]


def _kv_pairs(name, kv_loras, concept_count):
    pairs = {}
    for index, layers in kv_loras.items():
        if index >= concept_count:
            raise FusionStatsError(f"fusion stats {name}: k/v LoRA of concept {index} but only {concept_count} concepts")
        for path, parts in layers.items():
            if set(parts) != {"up", "down"} or parts["up"].shape[1] != parts["down"].shape[0]:
                raise FusionStatsError(f"fusion stats {name}: k/v LoRA {path} of concept {index} is incomplete")
            pairs.setdefault(index, {})[path] = (parts["up"], parts["down"])
    return pairs
