"""The original's L-BFGS replayed on the spectral form of a fusion layer.

The original fuses each layer with torch.optim.LBFGS(lr=1, max_iter=k, max_eval=⌊5k/4⌋,
history_size=25, line_search_fn="strong_wolfe", tolerance_grad=tolerance_change=1e-16) from W0 on
F.mse_loss = f/N (N = rows·d_out) and keeps the lowest loss any evaluation saw. On the objective
f(W0 + D) = c − 2 tr(D Rᵀ) + tr(D G Dᵀ) every iterate is D = R̃ diag(p(Λ)) Qᵀ (fusion_solver), and
every number the method looks at (losses, inner products of gradients and steps) is a sum over
the eigenvalues weighted by s_k. So the run is the same, step for step, on

    x ∈ R^rank,  f(x) − f* = Σ_k Λ_k x_k² − 2 √s_k x_k + s_k / Λ_k,   gradient 2(Λ x − √s)/N,

which costs O(rank) per evaluation. The same holds with x a [rows, rank] matrix whose column k
has squared norm s_k (the weight space itself is such a problem, with d_out rows: D Q = R̃ diag(p)),
and with more than one row the replay behaves like the weight-space run under rounding
(fusion_solver.replay_columns). Two quantities torch reads in coordinates are carried over
from the weight space: the first trial step min(1, 1/‖g‖₁)·lr, with ‖g‖₁ = 2‖R‖₁/N at W0 (passed
in), and the max-norms compared with 1e-16 (never reached in practice). This module ports
torch.optim.lbfgs (step and _strong_wolfe) to float64 numpy line by line; tests check it against
torch's own optimizer run on the weights.
"""
import numpy as np

HISTORY = 25
TOLERANCE = 1e-16
C1, C2 = 1e-4, 0.9
MAX_LINE_SEARCH = 25


class SpectralProblem:
    """f − f* and its gradient (both divided by N) on x, tracking the lowest excess evaluated.
    weights: s_k (one coordinate per eigenvalue), or columns [rows, rank] with ‖column k‖² = s_k."""

    def __init__(self, eigvals, weights, mean_over):
        self.eigvals = np.asarray(eigvals, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float64)
        self.rhs = weights if weights.ndim == 2 else np.sqrt(weights)
        self.reducible = float(np.sum(self.rhs * self.rhs / self.eigvals))
        self.mean_over = float(mean_over)
        self.best = self.reducible

    def evaluate(self, x):
        excess = float(np.vdot(self.eigvals * x - 2.0 * self.rhs, x)) + self.reducible
        self.best = min(self.best, excess)
        return excess / self.mean_over, 2.0 * (self.eigvals * x - self.rhs) / self.mean_over


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    xmin_bound, xmax_bound = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square < 0:
        return (xmin_bound + xmax_bound) / 2.0
    d2 = d2_square ** 0.5
    if x1 <= x2:
        min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(min_pos, xmin_bound), xmax_bound)


def _strong_wolfe(evaluate, x, t, d, f, g, gtd, max_ls):
    """torch.optim.lbfgs._strong_wolfe: (f, g, t, evaluations)."""
    d_norm = np.abs(d).max()
    f_new, g_new = evaluate(x + t * d)
    evals, gtd_new = 1, float(np.vdot(g_new, d))
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done, ls_iter = False, 0
    while ls_iter < max_ls:
        if f_new > (f + C1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f, bracket_g, bracket_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -C2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f, bracket_g, bracket_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        min_step, max_step = t + 0.01 * (t - t_prev), t * 10
        t_prev, t = t, _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        f_prev, g_prev, gtd_prev = f_new, g_new, gtd_new
        f_new, g_new = evaluate(x + t * d)
        evals += 1
        gtd_new = float(np.vdot(g_new, d))
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < TOLERANCE:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) else min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = evaluate(x + t * d)
        evals += 1
        gtd_new = float(np.vdot(g_new, d))
        ls_iter += 1
        if f_new > (f + C1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos], bracket_f[high_pos], bracket_g[high_pos], bracket_gtd[high_pos] = t, f_new, g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -C2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos], bracket_g[low_pos], bracket_gtd[low_pos] = t, f_new, g_new, gtd_new
    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], evals


def _direction(g, old_dirs, old_stps, ro, h_diag):
    """The two-loop recursion: −H g."""
    q, al = -g, [0.0] * len(old_dirs)
    for i in range(len(old_dirs) - 1, -1, -1):
        al[i] = float(np.vdot(old_stps[i], q)) * ro[i]
        q = q - al[i] * old_dirs[i]
    r = q * h_diag
    for i in range(len(old_dirs)):
        be_i = float(np.vdot(old_dirs[i], r)) * ro[i]
        r = r + (al[i] - be_i) * old_stps[i]
    return r


def lbfgs_excess(eigvals, weights, mean_over, first_gradient_l1, max_iter):
    """Lowest f − f* the original's L-BFGS evaluates in max_iter iterations (module docstring).
    first_gradient_l1: ‖∇F.mse_loss‖₁ at W0 in weight space, which sets torch's first trial step."""
    problem = SpectralProblem(eigvals, weights, mean_over)
    max_eval = max_iter * 5 // 4
    x = np.zeros_like(problem.rhs)
    loss, g = problem.evaluate(x)
    evals = 1
    if np.abs(g).max() <= TOLERANCE or max_iter <= 0:
        return problem.best
    old_dirs, old_stps, ro, h_diag, d, t = [], [], [], 1.0, None, None
    for n_iter in range(1, max_iter + 1):
        if n_iter == 1:
            d = -g
        else:
            y, s = g - prev_g, d * t
            ys = float(np.vdot(y, s))
            if ys > 1e-10:
                if len(old_dirs) == HISTORY:
                    old_dirs.pop(0), old_stps.pop(0), ro.pop(0)
                old_dirs.append(y), old_stps.append(s), ro.append(1.0 / ys)
                h_diag = ys / float(np.vdot(y, y))
            d = _direction(g, old_dirs, old_stps, ro, h_diag)
        prev_g, prev_loss = g, loss
        t = min(1.0, 1.0 / first_gradient_l1) if n_iter == 1 else 1.0
        gtd = float(np.vdot(g, d))
        if gtd > -TOLERANCE:
            break
        loss, g, t, ls_evals = _strong_wolfe(problem.evaluate, x, t, d, loss, g, gtd, max_eval - evals)
        x = x + t * d
        evals += ls_evals
        if n_iter == max_iter or evals >= max_eval or np.abs(g).max() <= TOLERANCE:
            break
        if np.abs(d * t).max() <= TOLERANCE or abs(loss - prev_loss) < TOLERANCE:
            break
    return problem.best
