"""Saved fusion statistics: the per-layer sums that make gradient fusion incremental.

For every fused layer the file keeps LayerStats (G = Σ G_i, R = Σ ΔW_i G_i, c, rows) summed over
the fused concepts, so fusing one more concept only needs that concept's capture. Layer names
are "text_encoder:<HF path>" or "unet:<diffusers path>". Metadata records the concepts (words,
alphas, source file), the solver tolerance and the format version.

    mixofshow.format = "fusion_stats", mixofshow.format_version = "1",
    mixofshow.concepts = JSON list of {"name", "words", "unet_alpha", "text_encoder_alpha"},
    mixofshow.tolerance = the solve tolerance used, or "match_lbfgs" for the rule that matches the
    original's L-BFGS objective (tolerance None), mixofshow.kv_positions = the k/v rows used,
    mixofshow.checkpoint_sha256 = SHA-256 of the fused checkpoint the file belongs to (when saved beside one)
    tensors: "<layer>|gram", "<layer>|rhs", "<layer>|energy", "<layer>|rows", and each concept's
    cross-attention k/v LoRA "kv|<concept index>|<path>|up" / "|down" (α folded into up): the k/v
    stage only needs text-encoder passes, so adding a concept recomputes it for all concepts
    with the new fused text encoder instead of reusing stale sums.
"""
import json
import os
from dataclasses import dataclass, field

from .fusion_solver import LayerStats
from .safe_io import UnreadableFileError, read_safetensors, save_safetensors

FORMAT_VERSION = "1"
STAT_PARTS = ("gram", "rhs", "energy", "rows")
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


def save_fusion_stats(stats, path, checkpoint_sha256=None):
    """Writes `stats`; `checkpoint_sha256` binds the file to the checkpoint it was saved beside."""
    tensors = {f"{name}|{part}": value for name, layer in stats.layers.items()
               for part, value in layer.to_tensors().items()}
    for index, layers in stats.kv_loras.items():
        for layer_path, (up, down) in layers.items():
            tensors[f"{KV_PREFIX}{index}|{layer_path}|up"] = up.contiguous()
            tensors[f"{KV_PREFIX}{index}|{layer_path}|down"] = down.contiguous()
    metadata = {"mixofshow.format": "fusion_stats", "mixofshow.format_version": FORMAT_VERSION,
                "mixofshow.concepts": json.dumps(stats.concepts), "mixofshow.tolerance": _tolerance_text(stats.tolerance),
                "mixofshow.kv_positions": stats.kv_positions}
    if checkpoint_sha256 is not None:
        metadata[CHECKPOINT_HASH_KEY] = checkpoint_sha256
    save_safetensors(tensors, path, metadata)


def load_fusion_stats(path, checkpoint_sha256=None):
    """The statistics in `path`; with `checkpoint_sha256`, only if they were saved with that checkpoint."""
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
    if metadata.get("mixofshow.format_version") != FORMAT_VERSION:
        raise FusionStatsError(f"fusion stats {name}: unsupported format version {metadata.get('mixofshow.format_version')}")
    try:
        concepts = json.loads(metadata["mixofshow.concepts"])
        tolerance = _tolerance_value(metadata["mixofshow.tolerance"])
    except (KeyError, ValueError) as e:
        raise FusionStatsError(f"fusion stats {name}: corrupted metadata ({e})") from e
    grouped, kv_loras = {}, {}
    for key, value in tensors.items():
        if key.startswith(KV_PREFIX):
            index, path, part = _kv_key(name, key)
            kv_loras.setdefault(index, {}).setdefault(path, {})[part] = value
            continue
        layer, _, part = key.rpartition("|")
        if part not in STAT_PARTS:
            raise FusionStatsError(f"fusion stats {name}: unknown tensor {key!r}")
        grouped.setdefault(layer, {})[part] = value
    layers = {}
    for layer, parts in grouped.items():
        try:
            layers[layer] = LayerStats.from_tensors(parts)
        except ValueError as e:
            raise FusionStatsError(f"fusion stats {name}: layer {layer}: {e}") from e
        if not bool(layers[layer].gram.isfinite().all() and layers[layer].rhs.isfinite().all()):
            raise FusionStatsError(f"fusion stats {name}: layer {layer} contains NaN or inf")
    return FusionStats(layers, concepts, tolerance, metadata.get("mixofshow.kv_positions", "all"),
                       _kv_pairs(name, kv_loras, len(concepts)))


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
