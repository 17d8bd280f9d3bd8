"""Multi-concept merge baselines the gradient fusion is compared with (notes §5.2), on plain tensors.

Weight average (FedAvg; the research branch's Weight_Fusion_EDLoRA):
    ΔW = Σ_i α_i ΔW_i / N                       each concept is diluted by 1/N.

Custom Diffusion constrained merge (attn2 k/v only; its compose script's exact update). Rows are
tokens: C [n_c, d_in] stacks every concept's token features, V [n_c, d_out] their fine-tuned
outputs W_i c, K [n_k, d_in] the features of regularisation captions. It solves
    min_W ‖K Wᵀ − K W0ᵀ‖²   subject to   C Wᵀ = V,
whose Lagrange conditions give, with M = KᵀK,
    D = C M⁻¹,    W = W0 + (Vᵀ − W0 Cᵀ)(D Cᵀ)⁻¹ D.
Both inverses are taken with a relative ridge (ridge · mean eigenvalue · I, float64) so that a
rank-deficient K (fewer caption tokens than d_in) or nearly dependent constraints stay solvable; the
constraints then hold up to O(ridge) relative error.

Orthogonal merge (ZipLoRA, generalised to N concepts). ΔW_m = Σ_i ΔW_i diag(m_i) with one
coefficient per input column and concept (m_i ∈ R^{d_in}, start at 1), learned with Adam on
    Σ_i tr((ΔW_m − ΔW_i) G_i (ΔW_m − ΔW_i)ᵀ) / tr(ΔW_i G_i ΔW_iᵀ)  +  w Σ_{i<j} |cos(m_i, m_j)|,
i.e. every concept's layer outputs ‖X_i (ΔW_m − ΔW_i)ᵀ‖² kept relative to its own change, plus
ZipLoRA's term pushing the coefficient vectors apart. At m_i = m_j the cosine term has zero
gradient, so a seeded perturbation of size init_noise breaks the tie (deterministic per seed). It
needs every concept's Gram G_i separately: memory grows with N, unlike the gradient solve's one
summed Gram.
"""
from pathlib import Path

import torch

CAPTIONS_FILE = Path(__file__).resolve().parent / "data" / "regularization_captions.txt"


def regularization_captions(limit=None):
    """The shipped generic captions for Custom Diffusion's regulariser (first `limit` of them)."""
    lines = CAPTIONS_FILE.read_text(encoding="utf-8").splitlines()
    captions = [line.strip() for line in lines if line.strip()]
    return captions if limit is None else captions[:limit]


def weight_average(deltas, alphas=None):
    """Σ_i α_i ΔW_i / N."""
    if not deltas:
        raise ValueError("weight_average needs at least one delta")
    alphas = [1.0] * len(deltas) if alphas is None else list(alphas)
    if len(alphas) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(alphas)} alphas")
    shape = deltas[0].shape
    for delta in deltas:
        if delta.shape != shape:
            raise ValueError(f"delta shapes differ: {tuple(shape)} vs {tuple(delta.shape)}")
    return sum(alpha * delta for alpha, delta in zip(alphas, deltas)) / len(deltas)


def _stack_rows(parts, width, what):
    if isinstance(parts, (list, tuple)):
        parts = torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])
    rows = parts.reshape(-1, parts.shape[-1]).to(torch.float64)
    if rows.shape[1] != width:
        raise ValueError(f"{what} rows have width {rows.shape[1]}, expected {width}")
    return rows


def _ridged(matrix, ridge):
    """matrix + ridge · (tr(matrix) / n) · I."""
    n = matrix.shape[0]
    scale = float(torch.trace(matrix)) / n if n else 0.0
    scale = scale if scale > 0.0 else 1.0
    return matrix + ridge * scale * torch.eye(n, dtype=matrix.dtype, device=matrix.device)


def custom_diffusion_merge(w0, concept_inputs, concept_targets, reg_inputs, ridge=1e-6):
    """Custom Diffusion's closed form W = W0 + (Vᵀ − W0 Cᵀ)(D Cᵀ)⁻¹ D, D = C (KᵀK)⁻¹ (module docstring).

    concept_inputs: C (tensor [n_c, d_in] or a list of per-concept tensors); concept_targets: V
    (matching [n_c, d_out] rows, W_i c); reg_inputs: K [n_k, d_in]. Returns W like w0."""
    d_out, d_in = w0.shape
    c = _stack_rows(concept_inputs, d_in, "concept input")
    v = _stack_rows(concept_targets, d_out, "concept target")
    k = _stack_rows(reg_inputs, d_in, "regulariser input")
    if c.shape[0] != v.shape[0]:
        raise ValueError(f"{c.shape[0]} concept input rows but {v.shape[0]} target rows")
    w0_64 = w0.to(torch.float64)
    c, v, k = c.to(w0.device), v.to(w0.device), k.to(w0.device)
    d = torch.linalg.solve(_ridged(k.T @ k, ridge), c.T).T              # C M⁻¹ (M symmetric)
    lagrange = torch.linalg.solve(_ridged(d @ c.T, ridge), d)          # (D Cᵀ)⁻¹ D
    return (w0_64 + (v.T - w0_64 @ c.T) @ lagrange).to(w0.dtype)


def _gram_energy(change, gram):
    """tr(E G Eᵀ) = ‖X Eᵀ‖² for G = XᵀX."""
    return ((change @ gram) * change).sum()


def gram_factor(gram, rcond=1e-12):
    """L [d_in, rank] with L Lᵀ = G (eigenvalues below rcond·λ_max dropped), so that
    tr(E G Eᵀ) = ‖E L‖²: a rank-r Gram costs d_out·d_in·r per evaluation instead of d_out·d_in²."""
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    keep = values > rcond * max(float(values.max()), 0.0)
    return vectors[:, keep] * values[keep].sqrt()


def merge_with_coefficients(deltas, coefficients):
    """ΔW_m = Σ_i ΔW_i diag(m_i); coefficients [N, d_in]."""
    return sum(delta * coefficient for delta, coefficient in zip(deltas, coefficients))


def orthogonal_merge_terms(deltas, grams, coefficients, factors=None):
    """(reconstruction, overlap) terms of the orthogonal-merge loss (module docstring);
    `factors` (gram_factor of each Gram) make the reconstruction cheaper, same value."""
    merged = merge_with_coefficients(deltas, coefficients)
    if factors is None:
        reconstruction = sum(_gram_energy(merged - delta, gram) / _gram_energy(delta, gram)
                             for delta, gram in zip(deltas, grams))
    else:
        reconstruction = sum(((merged - delta) @ factor).square().sum() / (delta @ factor).square().sum()
                             for delta, factor in zip(deltas, factors))
    unit = coefficients / coefficients.norm(dim=1, keepdim=True)
    cosines = unit @ unit.T
    overlap = cosines.triu(diagonal=1).abs().sum()
    return reconstruction, overlap


def orthogonal_merge(deltas, grams, steps=300, lr=1e-2, overlap_weight=0.01, seed=0, init_noise=1e-3):
    """ZipLoRA-style merge: returns (ΔW_m like deltas[0], coefficients [N, d_in] float64)."""
    if len(deltas) != len(grams) or not deltas:
        raise ValueError(f"orthogonal_merge needs one Gram per delta, got {len(deltas)} deltas, {len(grams)} grams")
    d_in = deltas[0].shape[1]
    for delta, gram in zip(deltas, grams):
        if delta.shape != deltas[0].shape or gram.shape != (d_in, d_in):
            raise ValueError(f"delta {tuple(delta.shape)} / gram {tuple(gram.shape)} do not match "
                             f"delta {tuple(deltas[0].shape)}")
    device = deltas[0].device
    deltas64 = [delta.to(torch.float64) for delta in deltas]
    factors = [gram_factor(gram.to(device=device)) for gram in grams]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(deltas), d_in, generator=generator, dtype=torch.float64)
    coefficients = (1.0 + init_noise * noise).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        reconstruction, overlap = orthogonal_merge_terms(deltas64, grams, coefficients, factors)
        (reconstruction + overlap_weight * overlap).backward()
        optimizer.step()
    coefficients = coefficients.detach()
    return merge_with_coefficients(deltas64, coefficients).to(deltas[0].dtype), coefficients
