"""The .fusionstats file: format 2 (shared packed Grams, factored R) round trip, size, format 1 still read."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from comfyui_mixofshow.mixofshow_core.fusion_solver import LayerStats, solve, solve_like_lbfgs
from comfyui_mixofshow.mixofshow_core.fusion_stats import (FusionStats, FusionStatsError, load_fusion_stats,
                                                             save_fusion_stats)

F64 = torch.float64
D_IN = 24


def gram_of(rows):
    """X^T X through addmm, as GramAccumulator forms it (not bitwise symmetric in general)."""
    return torch.zeros(rows.shape[1], rows.shape[1], dtype=F64).addmm_(rows.T, rows)


def sample_stats(seed=0):
    """Two concepts; q/k/v read one input (equal Grams), `out` another; a dense-delta layer and a
    layer one concept has no LoRA on (zero delta)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [[torch.randn(30, D_IN, generator=gen, dtype=F64) for _ in range(2)] for _ in range(2)]
    layers = {}
    for name, rows in (("text_encoder:q", inputs[0]), ("text_encoder:k", inputs[0]), ("text_encoder:v", inputs[0]),
                       ("text_encoder:out", inputs[1])):
        total = None
        for x in rows:
            up, down = torch.randn(16, 2, generator=gen, dtype=F64), torch.randn(2, D_IN, generator=gen, dtype=F64)
            stats = LayerStats.from_lora(gram_of(x), up, down, 0.7)
            total = stats if total is None else total.add_(stats)
        layers[name] = total
    dense = torch.randn(16, D_IN, generator=gen, dtype=F64)
    layers["unet:dense"] = (LayerStats.from_concept(gram_of(inputs[1][0]), dense)
                            + LayerStats.from_concept(gram_of(inputs[1][1]), torch.zeros(16, D_IN, dtype=F64)))
    for layer in layers.values():
        layer.rows = 60
    return FusionStats(layers, [{"name": "a", "words": ["<a1>"], "unet_alpha": 1.0, "text_encoder_alpha": 1.0},
                                {"name": "b", "words": ["<b1>"], "unet_alpha": 1.0, "text_encoder_alpha": 1.0}],
                       None, "all", {})


def test_format_2_round_trip_is_exact_and_solves_identically(tmp_path):
    stats = sample_stats()
    path = str(tmp_path / "s.fusionstats")
    save_fusion_stats(stats, path)
    loaded = load_fusion_stats(path)
    assert loaded.concepts == stats.concepts and loaded.tolerance is None
    for name, layer in stats.layers.items():
        restored = loaded.layers[name]
        assert torch.equal(restored.rhs, layer.rhs), name
        assert restored.energy == layer.energy and restored.rows == layer.rows
        # the lower triangle is exactly the saved one, the upper its mirror
        assert torch.equal(restored.gram.tril(), layer.gram.tril()) and torch.equal(restored.gram, restored.gram.T)
        assert torch.allclose(restored.gram, layer.gram, rtol=1e-15, atol=0)
        # eigh reads the lower triangle only: the solve is bitwise the in-memory one
        assert torch.equal(solve(restored, 1e-3)[0], solve(layer, 1e-3)[0])
        assert torch.equal(solve_like_lbfgs(restored, 30)[0], solve_like_lbfgs(layer, 30)[0])
    # q/k/v share one stored Gram, loaded as one tensor
    assert loaded.layers["text_encoder:q"].gram is loaded.layers["text_encoder:k"].gram
    assert loaded.layers["text_encoder:q"].gram is not loaded.layers["text_encoder:out"].gram


def write_format_1(stats, path):
    """The format-1 layout, written with plain safetensors: every layer's dense G, R, c, rows."""
    tensors = {}
    for name, layer in stats.layers.items():
        tensors.update({f"{name}|gram": layer.gram.contiguous(), f"{name}|rhs": layer.rhs.contiguous(),
                        f"{name}|energy": torch.tensor([layer.energy], dtype=F64),
                        f"{name}|rows": torch.tensor([layer.rows], dtype=torch.int64)})
    save_file(tensors, path, {"mixofshow.format": "fusion_stats", "mixofshow.format_version": "1",
                              "mixofshow.concepts": json.dumps(stats.concepts), "mixofshow.tolerance": "0.001",
                              "mixofshow.kv_positions": "all"})


def test_format_1_files_still_load_and_format_2_is_smaller(tmp_path):
    stats = sample_stats(seed=1)
    old, new = str(tmp_path / "old.fusionstats"), str(tmp_path / "new.fusionstats")
    write_format_1(stats, old)
    save_fusion_stats(stats, new)
    loaded = load_fusion_stats(old)
    assert loaded.tolerance == 1e-3
    for name, layer in stats.layers.items():
        assert torch.equal(loaded.layers[name].gram, layer.gram) and torch.equal(loaded.layers[name].rhs, layer.rhs)
    # 4 Grams of 24² -> 2 triangles of 300; R of 16x24 -> factors 4x(16+24) where smaller
    assert os.path.getsize(new) < 0.5 * os.path.getsize(old)


def test_unknown_versions_and_broken_layers_give_one_clear_error(tmp_path):
    stats = sample_stats(seed=2)
    path = str(tmp_path / "s.fusionstats")
    write_format_1(stats, path)
    tensors = {f"text_encoder:q|{p}": t for p, t in stats.layers["text_encoder:q"].to_tensors().items()}
    save_file(tensors, path, {"mixofshow.format": "fusion_stats", "mixofshow.format_version": "3",
                              "mixofshow.concepts": "[]", "mixofshow.tolerance": "0.001"})
    with pytest.raises(FusionStatsError, match="unsupported format version 3"):
        load_fusion_stats(path)
    save_fusion_stats(stats, path)
    from safetensors.torch import load_file
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors["text_encoder:q|rhs_ranks"]
    save_file(tensors, path, metadata)
    with pytest.raises(FusionStatsError, match="layer text_encoder:q: incomplete"):
        load_fusion_stats(path)
