"""Merge baselines checked against explicit formulas, KKT systems and explicit layer outputs."""
import torch
import torch.nn.functional as F
import pytest

from comfyui_mixofshow.mixofshow_core.merge_baselines import (
    custom_diffusion_merge, orthogonal_merge, regularization_captions, weight_average)

F64 = torch.float64


def test_weight_average_is_the_alpha_weighted_mean():
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    merged = weight_average(deltas, [1.0, 0.5, 2.0])
    expected = (deltas[0] + 0.5 * deltas[1] + 2.0 * deltas[2]) / 3
    assert torch.allclose(merged, expected, atol=1e-6)
    assert torch.allclose(weight_average(deltas), (deltas[0] + deltas[1] + deltas[2]) / 3, atol=1e-6)


def test_weight_average_rejects_mismatches():
    with pytest.raises(ValueError, match="alphas"):
        weight_average([torch.zeros(2, 2)], [1.0, 1.0])
    with pytest.raises(ValueError, match="shapes differ"):
        weight_average([torch.zeros(2, 2), torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="at least one"):
        weight_average([])


def concept_problem(d_out=12, d_in=32, tokens=(3, 3, 2), reg_rows=120, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=F64)
    inputs = [torch.randn(n, d_in, generator=gen, dtype=F64) for n in tokens]
    weights = [w0 + 0.3 * torch.randn(d_out, d_in, generator=gen, dtype=F64) for _ in tokens]
    targets = [c @ w.T for c, w in zip(inputs, weights)]
    reg = torch.randn(reg_rows, d_in, generator=gen, dtype=F64)
    return w0, inputs, targets, reg


def test_custom_diffusion_satisfies_the_concept_constraints():
    w0, inputs, targets, reg = concept_problem()
    merged = custom_diffusion_merge(w0, inputs, targets, reg)
    c, v = torch.cat(inputs), torch.cat(targets)
    assert torch.linalg.matrix_rank(c) == c.shape[0]
    assert float((c @ merged.T - v).norm() / (v - c @ w0.T).norm()) < 1e-5


def test_custom_diffusion_matches_the_kkt_solution():
    """min tr(E KᵀK Eᵀ) s.t. C Eᵀ = V − C W0ᵀ, solved as one KKT system [[2KᵀK, Cᵀ], [C, 0]]."""
    w0, inputs, targets, reg = concept_problem(seed=2)
    c, v = torch.cat(inputs), torch.cat(targets)
    n_c, d_in = c.shape
    kkt = torch.zeros(d_in + n_c, d_in + n_c, dtype=F64)
    kkt[:d_in, :d_in] = 2 * reg.T @ reg
    kkt[:d_in, d_in:] = c.T
    kkt[d_in:, :d_in] = c
    rhs = torch.cat([torch.zeros(d_in, w0.shape[0], dtype=F64), v - c @ w0.T])
    change = torch.linalg.solve(kkt, rhs)[:d_in].T
    merged = custom_diffusion_merge(w0, c, v, reg, ridge=1e-12)
    assert float((merged - (w0 + change)).norm() / change.norm()) < 1e-8


def test_custom_diffusion_keeps_w0_on_the_regulariser_subspace():
    """Concept features orthogonal to every caption feature: captions' outputs stay those of W0."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(10, 24, generator=gen, dtype=F64)
    basis, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=F64))
    reg = torch.randn(200, 16, generator=gen, dtype=F64) @ basis[:, :16].T
    concepts = torch.randn(5, 8, generator=gen, dtype=F64) @ basis[:, 16:].T
    targets = concepts @ (w0 + torch.randn(10, 24, generator=gen, dtype=F64)).T
    merged = custom_diffusion_merge(w0, [concepts[:3], concepts[3:]], [targets[:3], targets[3:]], reg)
    assert float((reg @ (merged - w0).T).norm() / (reg @ w0.T).norm()) < 1e-8
    assert float((concepts @ merged.T - targets).norm() / targets.norm()) < 1e-5


def test_custom_diffusion_rejects_mismatched_rows():
    w0, inputs, targets, reg = concept_problem()
    with pytest.raises(ValueError, match="target rows"):
        custom_diffusion_merge(w0, inputs, targets[:2], reg)
    with pytest.raises(ValueError, match="regulariser input rows have width 31"):
        custom_diffusion_merge(w0, inputs, targets, reg[:, :31])


def disjoint_concepts(seed=4):
    """Two concepts whose deltas use disjoint input columns and whose inputs mostly live there."""
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in, half = 12, 16, 8
    xs, deltas = [], []
    for part in (slice(0, half), slice(half, d_in)):
        x = 0.05 * torch.randn(60, d_in, generator=gen, dtype=F64)
        x[:, part] = torch.randn(60, half, generator=gen, dtype=F64)
        delta = torch.zeros(d_out, d_in, dtype=F64)
        delta[:, part] = torch.randn(d_out, half, generator=gen, dtype=F64)
        xs.append(x)
        deltas.append(delta)
    return xs, deltas


def relative_output_loss(xs, deltas, merged):
    """Σ_i ‖X_i (ΔW_m − ΔW_i)ᵀ‖² / ‖X_i ΔW_iᵀ‖² from the explicit inputs."""
    return float(sum(((x @ (merged - d).T) ** 2).sum() / ((x @ d.T) ** 2).sum() for x, d in zip(xs, deltas)))


def overlap_of(coefficients):
    return float(F.cosine_similarity(coefficients[0], coefficients[1], dim=0).abs())


def test_orthogonal_merge_keeps_outputs_better_than_weight_averaging():
    xs, deltas = disjoint_concepts()
    grams = [x.T @ x for x in xs]
    merged, coefficients = orthogonal_merge(deltas, grams, steps=150, lr=0.05, overlap_weight=0.1)
    start, start_coefficients = orthogonal_merge(deltas, grams, steps=0, overlap_weight=0.1)
    ortho_loss = relative_output_loss(xs, deltas, merged)
    assert coefficients.shape == (2, 16)
    assert ortho_loss < 0.1 * relative_output_loss(xs, deltas, weight_average(deltas))
    assert overlap_of(start_coefficients) > 0.99 and overlap_of(coefficients) < 0.5
    start_total = relative_output_loss(xs, deltas, start) + 0.1 * overlap_of(start_coefficients)
    assert ortho_loss + 0.1 * overlap_of(coefficients) < 0.5 * start_total


def test_orthogonal_merge_is_deterministic_for_a_seed():
    xs, deltas = disjoint_concepts(seed=5)
    grams = [x.T @ x for x in xs]
    first = orthogonal_merge(deltas, grams, steps=20, seed=7)
    again = orthogonal_merge(deltas, grams, steps=20, seed=7)
    other = orthogonal_merge(deltas, grams, steps=20, seed=8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_orthogonal_merge_rejects_missing_grams():
    with pytest.raises(ValueError, match="one Gram per delta"):
        orthogonal_merge([torch.zeros(3, 4)] * 2, [torch.eye(4)])
    with pytest.raises(ValueError, match="do not match"):
        orthogonal_merge([torch.zeros(3, 4)], [torch.eye(5)])


def test_regularization_captions_are_shipped():
    captions = regularization_captions()
    assert len(captions) >= 100
    assert len(set(captions)) == len(captions)
    assert all(caption == caption.strip() and caption for caption in captions)
    assert regularization_captions(limit=10) == captions[:10]


def test_gram_factor_gives_the_same_reconstruction_for_rank_deficient_grams():
    from comfyui_mixofshow.mixofshow_core.merge_baselines import gram_factor, orthogonal_merge_terms
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(5, 12, generator=g, dtype=torch.float64) for _ in range(2)]  # rank 5 < 12
    grams = [x.T @ x for x in xs]
    deltas = [torch.randn(4, 12, generator=g, dtype=torch.float64) for _ in range(2)]
    coefficients = torch.rand(2, 12, generator=g, dtype=torch.float64)
    factor = gram_factor(grams[0])
    assert factor.shape == (12, 5)
    plain = orthogonal_merge_terms(deltas, grams, coefficients)
    factored = orthogonal_merge_terms(deltas, grams, coefficients, [gram_factor(gr) for gr in grams])
    merged = sum(d * c for d, c in zip(deltas, coefficients))
    explicit = sum((x @ (merged - d).T).square().sum() / (x @ d.T).square().sum() for x, d in zip(xs, deltas))
    assert torch.allclose(plain[0], explicit) and torch.allclose(factored[0], explicit)
    assert torch.equal(plain[1], factored[1])
