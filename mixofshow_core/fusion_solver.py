"""Gradient fusion of one linear layer, solved in closed form from sufficient statistics.

Objective (Mix-of-Show gradient fusion, notes §3.2). For a pretrained weight W0 [d_out, d_in],
concept deltas ΔW_i (concept weights W_i = W0 + ΔW_i) and X_i [n_i, d_in], the rows concept i's
model feeds the layer, the fused weight minimises

    f(W) = Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²                      (sum of squares; targets exclude bias)

Sufficient statistics. With W = W0 + D, G_i = X_iᵀX_i, G = Σ_i G_i, R = Σ_i ΔW_i G_i and
c = Σ_i tr(ΔW_i G_i ΔW_iᵀ),

    f(W0 + D) = c − 2 tr(D Rᵀ) + tr(D G Dᵀ),

so (G, R, c) determine f: activations never have to be stored (memory O(d_in²) per layer, whatever
the number of rows or concepts) and the statistics of separate concepts add.

Minimisers. ∇f = 2 (D G − R), so minimisers satisfy D G = R. When G is singular they form an
affine family; the minimum-change one is D⁺ = R G⁺. Gradient-type methods started at W0 (the
original's L-BFGS) only move inside range(G) and converge to D⁺.

Regularised path. D(λ) = R (G + λI)⁻¹ minimises f(W0 + D) + λ‖D‖²_F. With G = Q Λ Qᵀ (computed
once, float64), R̃ = R Q and s_k = ‖R̃[:, k]‖²:

    ‖D(λ)‖²_F = Σ_k s_k / (Λ_k + λ)²                      decreasing in λ
    f(λ)      = f* + Σ_k s_k λ² / (Λ_k (Λ_k + λ)²)        increasing in λ
    f*        = c − Σ_k s_k / Λ_k                         λ → 0⁺: the pseudo-inverse optimum
    f(∞)      = c = f(W0)                                 λ → ∞: D = 0

The sums run over eigenvalues above rcond·d_in·Λ_max; smaller ones are float64 rounding noise of a
rank-deficient Gram and count as zero (in exact arithmetic R has no component there, because
range(G_i) ⊆ range(G)). Every quantity above is evaluated from (Λ, s) in O(d_in) per λ, so a
bisection step never refactorises.

Pareto property. D(λ) minimises f + λ‖·‖², hence no D' has f(D') ≤ f(D(λ)) and ‖D'‖ < ‖D(λ)‖
(otherwise f(D') + λ‖D'‖² would be smaller). The path is the frontier of (objective, change): for a
given objective bound it moves W the least of any method, L-BFGS included.

λ rule. No fixed λ (or λ/Λ_max) suits every layer: on captured SD1.5 data the λ needed to beat
L-BFGS on both objective and change spans two orders of magnitude between layers (notes §9). So λ
is chosen per layer by bisection on log λ:

    solve(tolerance=τ):          f(λ) − f* = τ (c − f*)   keep (1 − τ) of the reducible objective
    solve_to_objective(b):       f(λ) = b                 meet an objective bound

The bracket [Λ_min √t, Λ_max √t / (1 − √t)], t = target excess / (c − f*), always contains the
root (each term's share λ²/(Λ_k + λ)² is ≥ t at the top and ≤ t at the bottom). The bisection
returns the end of its final interval with f(λ) ≤ target, so the objective never exceeds the
request. τ = 0 gives D⁺ (λ = 0); τ ≥ 1 gives D = 0.

Matching the original (the default rule). The original runs L-BFGS (history 25, strong Wolfe, lr 1,
tolerances 1e-16, k iterations, at most 1.25·k evaluations, lowest loss kept) from W0 on
F.mse_loss = f/N, N = rows·d_out. It only forms gradients 2(D G − R)/N, inner products and linear
combinations of them, so every iterate is D = R̃ diag(p(Λ)) Qᵀ for one polynomial p and every inner
product it takes is Σ_k s_k·a(Λ_k)·b(Λ_k). The same L-BFGS on the rank-sized problem

    min_x Σ_k Λ_k x_k² − 2 √s_k x_k + s_k / Λ_k            (= f − f* at x_k = √s_k p(Λ_k))

therefore takes the same steps and reaches the same objective, at O(rank) per iteration instead
of O(rows·d_in·d_out) (spectral_lbfgs, which also carries over the one coordinate-dependent
quantity, the first trial step min(1, 1/‖g‖₁) with ‖g‖₁ = 2‖R‖₁/N at W0).

    solve_like_lbfgs(k):         f(λ) = f* + (f − f*) reached by k original L-BFGS iterations

is then the frontier point at the original's objective: the same objective with the least change.
Two details make the prediction match what the original's run reaches, not just its exact-arithmetic
path. (1) L-BFGS amplifies rounding differences over its iterations (its line-search branches
flip), so the replay runs on the measure pooled into eigenvalue bins of ~0.23 % (binned_measure):
sums that differ by rounding get the same prediction. (2) In weight space every eigen-direction
carries a d_out-wide column, and rounding pushes the iterate off the exact polynomial form into
directions a one-coordinate-per-eigenvalue replay does not have; on ill-conditioned layers that
replay then gets much further than any weight-space run (on a captured k/v layer: 9 % lower
objective than torch's L-BFGS in float64 and float32 alike, which agree to 1 %, and 1.8x the change).
So the replay runs on REPLAY_ROWS rows, seeded columns in general position with ‖column k‖² = s_k
(replay_columns): exact arithmetic takes the same steps, and under rounding it lands within a few
per cent of the weight-space runs. Where a run ends is itself a matter of rounding (two float64 runs
from W0 and from 0 differ by up to 15 % on short-history spatial layers), so the rule replays with
three column seeds and takes the least progress of the three (the highest objective): on layers
captured from a real fusion it then dominates torch's float32 L-BFGS (objective ≤ and change ≤) on
8/8 text-encoder, 32/32 k/v and 89/96 spatial layers, against 82/96 spatial with one seed and 2/8
text with the one-coordinate replay (bench_fusion_layers.py). The prediction is as sensitive to
rounding as L-BFGS itself: a 10⁻⁷ relative change of one layer's statistics moves it by 2-4 %.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .spectral_lbfgs import lbfgs_excess

DEFAULT_RCOND = 1e-12
BINS_PER_DECADE = 1000   # eigenvalue bins of ~0.23 % width for the L-BFGS replay
REPLAY_ROWS = 16         # rows of the replay's columns (8 already behave like d_out; module docstring)
REPLAY_SEEDS = (0, 1, 2)  # three replays; the rule takes the least progress of them
_BISECTION_STEPS = 200
_BISECTION_RELATIVE_WIDTH = 1e-12


def conv_input_rows(x):
    """[B, C, H, W] 1x1-conv input -> [B·H·W, C] rows (each pixel is one input row)."""
    if x.dim() != 4:
        raise ValueError(f"conv input must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def as_weight_matrix(weight):
    """A linear weight [d_out, d_in], or a 1x1 conv weight [d_out, d_in, 1, 1], as a matrix."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.reshape(weight.shape[0], weight.shape[1])
    raise ValueError(f"expected a [d_out, d_in] or [d_out, d_in, 1, 1] weight, got shape {tuple(weight.shape)}")


BLOCK_ROWS = 4096   # rows promoted to float64 at a time (GramAccumulator)


class GramAccumulator:
    """Streams input rows into G = Σ xᵀx (float64, on the first input's device) and counts them.

    Rows are promoted to float64 BLOCK_ROWS at a time, so no float64 copy of a whole activation is
    made. The products are float64 on purpose: float32 partial Grams (measured) add rounding noise
    of ~10⁻⁷·Λ_max in the null space of rank-deficient Grams (text and k/v layers), which the solve
    then fits, and incremental fusion no longer equals fusing from scratch (k/v 2 % apart instead of
    < 0.1 %). Products of float32 (or half) values are exact in float64."""

    def __init__(self, d_in):
        self.d_in = d_in
        self.gram = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.rows = 0

    def add(self, x):
        """Add rows x [..., d_in] of any dtype/device."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input rows have width {x.shape[-1]}, accumulator expects d_in={self.d_in}")
        if self.rows == 0:
            self.gram = self.gram.to(x.device)
        rows = x.detach().reshape(-1, self.d_in)
        for block in rows.split(BLOCK_ROWS):
            block = block.to(device=self.gram.device, dtype=torch.float64)
            self.gram.addmm_(block.T, block)
        self.rows += rows.shape[0]

    def add_conv(self, x):
        """Add a [B, C, H, W] input of a 1x1 conv (rows of C)."""
        self.add(conv_input_rows(x))


def _gram_copy(gram):
    """(float64 copy, rows): a copy, so an accumulator that keeps streaming leaves the stats intact."""
    if isinstance(gram, GramAccumulator):
        return gram.gram.clone(), gram.rows
    return gram.to(torch.float64, copy=True), 0


@dataclass
class LayerStats:
    """Sufficient statistics of one layer's fusion objective (module docstring)."""

    gram: torch.Tensor   # G = Σ G_i            [d_in, d_in] float64
    rhs: torch.Tensor    # R = Σ ΔW_i G_i       [d_out, d_in] float64
    energy: float        # c = Σ tr(ΔW_i G_i ΔW_iᵀ) = f(W0)
    rows: int = 0        # number of input rows behind G
    # R as a sum of low-rank products [(left_i, right_i)], R = Σ left_i @ right_i summed in this
    # order (LoRA concepts: left = scale·up, right = down G_i); None when R is only known dense
    rhs_factors: list = None

    @property
    def d_out(self):
        return self.rhs.shape[0]

    @property
    def d_in(self):
        return self.gram.shape[0]

    @classmethod
    def from_concept(cls, gram, delta):
        """Statistics of one concept: gram G_i (tensor or GramAccumulator), delta ΔW_i."""
        gram, rows = _gram_copy(gram)
        delta = as_weight_matrix(delta).to(device=gram.device, dtype=torch.float64)
        _check_delta_shape(delta.shape, gram)
        rhs = delta @ gram
        return cls(gram, rhs, float((rhs * delta).sum()), rows, [] if not bool(delta.any()) else None)

    @classmethod
    def from_lora(cls, gram, up, down, scale=1.0):
        """Statistics of ΔW_i = scale·up·down without forming ΔW_i: R_i = (scale·up)(down G_i),
        c_i = scale² tr((upᵀup)(down G_i downᵀ)), O(r·d_in²) instead of O(d_out·d_in²)."""
        gram, rows = _gram_copy(gram)
        up = as_weight_matrix(up).to(device=gram.device, dtype=torch.float64)
        down = as_weight_matrix(down).to(device=gram.device, dtype=torch.float64)
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA rank mismatch: up {tuple(up.shape)} vs down {tuple(down.shape)}")
        _check_delta_shape((up.shape[0], down.shape[1]), gram)
        down_gram, left = down @ gram, scale * up
        energy = scale * scale * float(((up.T @ up) * (down_gram @ down.T)).sum())
        return cls(gram, left @ down_gram, energy, rows, [(left, down_gram)])

    def _check_same_layer(self, other):
        if other.gram.shape != self.gram.shape or other.rhs.shape != self.rhs.shape:
            raise ValueError(f"cannot add stats of a [{other.d_out}, {other.d_in}] layer "
                             f"to stats of a [{self.d_out}, {self.d_in}] layer")

    def _factors_with(self, other):
        if self.rhs_factors is None or other.rhs_factors is None:
            return None
        return list(self.rhs_factors) + list(other.rhs_factors)

    def __add__(self, other):
        if not isinstance(other, LayerStats):
            return NotImplemented
        self._check_same_layer(other)
        device = self.gram.device
        return LayerStats(self.gram + other.gram.to(device), self.rhs + other.rhs.to(device),
                          self.energy + other.energy, self.rows + other.rows, self._factors_with(other))

    def add_(self, other):
        """In place: self += other (no new [d_in, d_in] buffers)."""
        self._check_same_layer(other)
        self.gram.add_(other.gram.to(self.gram.device))
        self.rhs.add_(other.rhs.to(self.rhs.device))
        self.energy += other.energy
        self.rows += other.rows
        self.rhs_factors = self._factors_with(other)
        return self

    def __radd__(self, other):
        """Lets sum() start from 0."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def to_tensors(self):
        """A flat dict of tensors (safetensors-storable) that from_tensors restores exactly."""
        return {"gram": self.gram.cpu().contiguous(), "rhs": self.rhs.cpu().contiguous(),
                "energy": torch.tensor([self.energy], dtype=torch.float64),
                "rows": torch.tensor([self.rows], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors):
        missing = {"gram", "rhs", "energy", "rows"} - set(tensors)
        if missing:
            raise ValueError(f"layer stats tensors lack {sorted(missing)}")
        gram, rhs = tensors["gram"].to(torch.float64), tensors["rhs"].to(torch.float64)
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or rhs.dim() != 2 or rhs.shape[1] != gram.shape[0]:
            raise ValueError(f"inconsistent stats shapes: gram {tuple(gram.shape)}, rhs {tuple(rhs.shape)}")
        return cls(gram, rhs, float(tensors["energy"].reshape(-1)[0]), int(tensors["rows"].reshape(-1)[0]))


def _check_delta_shape(delta_shape, gram):
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square [d_in, d_in], got shape {tuple(gram.shape)}")
    if delta_shape[1] != gram.shape[0]:
        raise ValueError(f"delta has d_in={delta_shape[1]} but gram is [{gram.shape[0]}, {gram.shape[1]}]")


def _check_change_shape(stats, delta):
    if tuple(delta.shape) != tuple(stats.rhs.shape):
        raise ValueError(f"weight change D has shape {tuple(delta.shape)}, "
                         f"layer stats expect [{stats.d_out}, {stats.d_in}]")


def objective(stats, delta):
    """f(W0 + D) = c − 2 tr(D Rᵀ) + tr(D G Dᵀ), from the statistics alone (float)."""
    delta = as_weight_matrix(delta).to(device=stats.gram.device, dtype=torch.float64)
    _check_change_shape(stats, delta)
    value = stats.energy - 2.0 * float((delta * stats.rhs).sum()) + float(((delta @ stats.gram) * delta).sum())
    return max(value, 0.0)   # a sum of squares; cancellation near an exact fit can dip below 0


@dataclass
class _Spectrum:
    """G = QΛQᵀ restricted to eigenvalues above the cutoff, with R̃ = RQ and s_k = ‖R̃[:, k]‖²."""

    eigvals: torch.Tensor   # Λ_k, kept only
    basis: torch.Tensor     # Q[:, kept]
    rhs_rot: torch.Tensor   # R̃[:, kept]
    weights: torch.Tensor   # s_k
    eigen_max: float
    cutoff: float

    @property
    def reducible(self):
        """c − f* = Σ s_k / Λ_k."""
        return float((self.weights / self.eigvals).sum())

    def excess(self, lam):
        """f(λ) − f* = Σ s_k λ² / (Λ_k (Λ_k + λ)²), free of the cancellation in c − f."""
        if math.isinf(lam):
            return self.reducible
        return float((self.weights * lam * lam / (self.eigvals * (self.eigvals + lam) ** 2)).sum())

    def delta_norm(self, lam):
        """‖D(λ)‖_F = (Σ s_k / (Λ_k + λ)²)^½."""
        if math.isinf(lam):
            return 0.0
        return math.sqrt(float((self.weights / (self.eigvals + lam) ** 2).sum()))

    def delta(self, lam):
        """D(λ) = R̃ diag(1/(Λ + λ)) Qᵀ (cut-off directions excluded)."""
        if math.isinf(lam):
            return torch.zeros(self.rhs_rot.shape[0], self.basis.shape[0],
                               dtype=torch.float64, device=self.basis.device)
        return (self.rhs_rot / (self.eigvals + lam)) @ self.basis.T


class ReusedEigh:
    """torch.linalg.eigh that reuses the previous decomposition when the next Gram is equal:
    layers reading the same input share G, and solving them one after another costs one eigh."""

    def __init__(self):
        self.gram, self.result = None, None

    def __call__(self, gram):
        if self.gram is None or self.gram.shape != gram.shape or not torch.equal(self.gram, gram):
            self.gram, self.result = gram, torch.linalg.eigh(gram)
        return self.result


def _spectrum(stats, rcond, eigh=torch.linalg.eigh):
    eigvals, basis = eigh(stats.gram)
    eigen_max = max(float(eigvals[-1]), 0.0) if eigvals.numel() else 0.0
    cutoff = rcond * stats.d_in * eigen_max
    kept = eigvals > cutoff
    if eigen_max == 0.0:
        kept = torch.zeros_like(kept)
    basis = basis[:, kept]
    rhs_rot = stats.rhs @ basis
    return _Spectrum(eigvals[kept], basis, rhs_rot, (rhs_rot * rhs_rot).sum(0), eigen_max, cutoff)


def _lambda_for_excess(spectrum, target_excess):
    """Smallest-change λ with excess(λ) ≤ target_excess, by bisection on log λ."""
    reducible = spectrum.reducible
    if target_excess <= 0.0:
        return 0.0
    if target_excess >= reducible:
        return math.inf
    root = math.sqrt(target_excess / reducible)
    low = float(spectrum.eigvals.min()) * root
    high = spectrum.eigen_max * root / (1.0 - root)
    for _ in range(_BISECTION_STEPS):
        if high <= low * (1.0 + _BISECTION_RELATIVE_WIDTH):
            break
        middle = math.sqrt(low * high)
        if spectrum.excess(middle) <= target_excess:
            low = middle
        else:
            high = middle
    return low


def _solution(stats, spectrum, lam, dtype):
    optimum = max(stats.energy - spectrum.reducible, 0.0)
    info = {
        "lambda": lam,
        "objective": optimum + spectrum.excess(lam),
        "objective_at_w0": stats.energy,
        "optimum": optimum,
        "delta_norm": spectrum.delta_norm(lam),
        "rank": int(spectrum.eigvals.numel()),
        "d_in": stats.d_in,
        "eigen_max": spectrum.eigen_max,
        "eigen_min_kept": float(spectrum.eigvals.min()) if spectrum.eigvals.numel() else 0.0,
        "eigen_cutoff": spectrum.cutoff,
        "rows": stats.rows,
    }
    return spectrum.delta(lam).to(dtype), info


def solve(stats, tolerance=1e-3, rcond=DEFAULT_RCOND, dtype=torch.float32, eigh=torch.linalg.eigh):
    """Fused weight change D (W = W0 + D) keeping (1 − tolerance) of the reducible objective with
    the least change: D(λ) = R (G + λI)⁻¹, λ from f(λ) − f* = tolerance·(c − f*). Returns (D, info).
    `eigh`: a ReusedEigh when consecutive layers may share G."""
    if not tolerance >= 0.0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    spectrum = _spectrum(stats, rcond, eigh)
    lam = _lambda_for_excess(spectrum, tolerance * spectrum.reducible) if tolerance < 1.0 else math.inf
    return _solution(stats, spectrum, lam, dtype)


def solve_to_objective(stats, max_objective, rcond=DEFAULT_RCOND, dtype=torch.float32):
    """Least-change D with f(W0 + D) ≤ max_objective (Pareto property, module docstring).
    A bound below the optimum f* yields the pseudo-inverse optimum (info['objective'] > bound)."""
    spectrum = _spectrum(stats, rcond)
    optimum = max(stats.energy - spectrum.reducible, 0.0)
    lam = _lambda_for_excess(spectrum, max_objective - optimum)
    return _solution(stats, spectrum, lam, dtype)


def binned_measure(spectrum, bins_per_decade=BINS_PER_DECADE):
    """The spectral measure (Λ_k, s_k) with eigenvalues pooled into log-spaced bins (Λ at the bin's
    centre, s summed, both rounded to float32): the replay's input is then the same for statistics
    that differ only by rounding (incremental vs from-scratch sums), where the exact eigenpairs are
    not, and L-BFGS amplifies such differences from iteration to iteration."""
    eigvals, weights = spectrum.eigvals.double(), spectrum.weights.double()
    index = torch.floor(torch.log10(eigvals) * bins_per_decade)
    bins, inverse = torch.unique(index, return_inverse=True)
    pooled = torch.zeros(bins.numel(), dtype=torch.float64).index_add_(0, inverse, weights)
    centres = 10.0 ** ((bins + 0.5) / bins_per_decade)
    return centres.float().double().cpu().numpy(), pooled.float().double().cpu().numpy()


def replay_columns(weights, rows=REPLAY_ROWS, seed=0):
    """[rows, len(weights)] seeded gaussian columns scaled to ‖column k‖² = weights[k] (module docstring)."""
    columns = np.random.default_rng(seed).standard_normal((rows, len(weights)))
    return columns * np.sqrt(weights / (columns * columns).sum(0))


def solve_like_lbfgs(stats, iterations, rcond=DEFAULT_RCOND, dtype=torch.float32, eigh=torch.linalg.eigh):
    """Least-change D reaching the objective the original's L-BFGS reaches in `iterations` steps
    from W0 (replayed on the spectrum, module docstring): the original's fit with less change than
    it (Pareto property). Returns (D, info); info['lbfgs_objective'] is the predicted objective."""
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    spectrum = _spectrum(stats, rcond, eigh)
    excess = 0.0
    if spectrum.eigvals.numel():
        mean_over = max(stats.rows, 1) * stats.d_out
        first_gradient_l1 = float(torch.tensor(2.0 * float(stats.rhs.abs().sum()) / mean_over, dtype=torch.float32))
        eigvals, weights = binned_measure(spectrum)
        share = max(lbfgs_excess(eigvals, replay_columns(weights, seed=seed), mean_over, first_gradient_l1, iterations)
                    for seed in REPLAY_SEEDS) / float((weights / eigvals).sum())
        excess = share * spectrum.reducible
    change, info = _solution(stats, spectrum, _lambda_for_excess(spectrum, excess), dtype)
    info["lbfgs_objective"] = info["optimum"] + excess
    return change, info


def lbfgs_reference(xs, targets, w0, iters, history_size=25):
    """The original's iterative solve (`update_quasi_newton`), for comparison: L-BFGS from W0 on
    F.mse_loss(X Wᵀ, Y) over all concepts' rows, one .step(closure), returning the lowest-loss W
    any closure evaluation saw. xs: X_i [n_i, d_in]; targets: Y_i = X_i (W0 + ΔW_i)ᵀ.
    Returns (W float32, {'loss': best mean-squared loss, 'evaluations': closure calls})."""
    w0 = as_weight_matrix(w0).float()
    x = torch.cat([xi.reshape(-1, w0.shape[1]) for xi in xs]).to(device=w0.device, dtype=torch.float32)
    y = torch.cat([yi.reshape(-1, w0.shape[0]) for yi in targets]).to(device=w0.device, dtype=torch.float32)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} input rows but {y.shape[0]} target rows")
    weight = w0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1, max_iter=iters, history_size=history_size,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-16, tolerance_change=1e-16)
    best = {"loss": math.inf, "weight": w0.clone(), "evaluations": 0}

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(x @ weight.T, y)
        loss.backward()
        best["evaluations"] += 1
        if loss.item() < best["loss"]:
            best["loss"] = loss.item()
            best["weight"] = weight.detach().clone()
        return loss

    optimizer.step(closure)
    return best["weight"], {"loss": best["loss"], "evaluations": best["evaluations"]}
