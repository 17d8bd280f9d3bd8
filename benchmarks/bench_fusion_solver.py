"""Closed-form gradient fusion vs the original's L-BFGS on identical synthetic captured inputs.

    python benchmarks/bench_fusion_solver.py [--quick] [--seed N]

Per layer: 3 concepts with rank-4 LoRA deltas, inputs shaped like SD1.5 captures (notes §3.3, §9):
a 768-wide text-encoder layer (528 rows: repeated prompt rows, low-rank token rows, two outlier
dimensions), a 768->320 cross-attention k/v layer (18 rows) and spatial layers 320/640/1280 wide
with many rows. L-BFGS runs with the original settings (history 25, strong Wolfe, tolerances 1e-16,
best W kept) for 500 iterations (text, k/v) or 50 (spatial). The closed form is timed from the raw
rows: Gram accumulation + LoRA statistics + solve (tolerance 1e-3). Objectives are evaluated in
float64 from the statistics for both. `--quick` keeps the original iteration counts but runs fewer
rows on the spatial layer and skips the 640/1280 layers.
"""
import argparse
import importlib
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_mixofshow"


def import_solver():
    """Registers the plugin folder as `comfyui_mixofshow` without running its ComfyUI __init__."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.mixofshow_core.fusion_solver")


fs = import_solver()
CONCEPTS = 3
LORA_RANK = 4


def outlier_rows(gen, n, d_in, basis):
    """Token-like rows: a shared low-dimensional subspace, small isotropic noise, two outlier dims."""
    rows = torch.randn(n, basis.shape[0], generator=gen) @ basis + 0.05 * torch.randn(n, d_in, generator=gen)
    rows[:, 7] += 25.0
    rows[:, 300 % d_in] -= 18.0
    return rows


def text_layer_inputs(gen, d_in=768, copies=16):
    """Per concept 16 layer copies x ("photo of a <c1> <c2>", "<c1> <c2>") = 176 rows. BOS, photo,
    of, a repeat in every copy (causal attention) and differ between concepts only by the earlier
    layers' LoRAs (1e-3 relative: near-duplicate rows with different targets make G ill-conditioned);
    concept-word and EOS rows vary around a per-concept base from copy to copy."""
    basis = torch.randn(128, d_in, generator=gen) / math.sqrt(128)
    prefix = outlier_rows(gen, 4, d_in, basis)
    inputs = []
    for _ in range(CONCEPTS):
        own_prefix = prefix * (1 + 1e-3 * torch.randn(prefix.shape, generator=gen))
        base = outlier_rows(gen, 6, d_in, basis)
        tokens = base + 0.1 * outlier_rows(gen, copies * 6, d_in, basis).reshape(copies, 6, d_in)
        first = torch.cat([own_prefix.expand(copies, 4, d_in), tokens[:, :3]], dim=1)
        second = torch.cat([own_prefix[:1].expand(copies, 1, d_in), tokens[:, 3:]], dim=1)
        inputs.append(torch.cat([first, second], dim=1).reshape(-1, d_in))
    return inputs


def kv_layer_inputs(gen, d_in=768):
    """Per concept the 2 concept tokens + EOS of 2 prompts: 6 rows."""
    basis = torch.randn(128, d_in, generator=gen) / math.sqrt(128)
    return [outlier_rows(gen, 6, d_in, basis) for _ in range(CONCEPTS)]


def spatial_layer_inputs(gen, d_in, rows):
    """Feature rows with a decaying spectrum in a basis shared by the concepts, concept-specific mean."""
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
    scales = torch.arange(1, d_in + 1, dtype=torch.float32) ** -0.7
    return [(torch.randn(rows, d_in, generator=gen) * scales) @ basis.T + 0.3 * torch.randn(d_in, generator=gen)
            for _ in range(CONCEPTS)]


def lora_factors(gen, d_out, d_in):
    return [(0.05 * torch.randn(d_out, LORA_RANK, generator=gen),
             torch.randn(LORA_RANK, d_in, generator=gen) / math.sqrt(d_in)) for _ in range(CONCEPTS)]


def closed_form(xs, factors):
    accumulators = [fs.GramAccumulator(xs[0].shape[1]) for _ in xs]
    for accumulator, x in zip(accumulators, xs):
        accumulator.add(x)
    stats = sum(fs.LayerStats.from_lora(acc, up, down) for acc, (up, down) in zip(accumulators, factors))
    solve_start = time.perf_counter()
    change, info = fs.solve(stats)
    return stats, change, info, time.perf_counter() - solve_start


def bench_layer(name, xs, d_out, iters, gen):
    d_in = xs[0].shape[1]
    w0 = torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)
    factors = lora_factors(gen, d_out, d_in)
    targets = [x @ (w0 + up @ down).T for x, (up, down) in zip(xs, factors)]

    start = time.perf_counter()
    w_lbfgs, _ = fs.lbfgs_reference(xs, targets, w0, iters)
    lbfgs_seconds = time.perf_counter() - start

    runs = []
    for _ in range(3):
        start = time.perf_counter()
        stats, change, info, solve_seconds = closed_form(xs, factors)
        runs.append((time.perf_counter() - start, solve_seconds))
    closed_seconds = statistics.median(run[0] for run in runs)
    solve_seconds = statistics.median(run[1] for run in runs)

    lbfgs_change = w_lbfgs - w0
    lbfgs_objective = fs.objective(stats, lbfgs_change)
    lbfgs_norm = float(lbfgs_change.double().norm())
    matched, _ = fs.solve_to_objective(stats, lbfgs_objective)
    pinv_norm = fs.solve(stats, tolerance=0.0)[1]["delta_norm"]
    return {
        "layer": name, "shape": f"{d_out}x{d_in}", "rows": sum(x.shape[0] for x in xs),
        "rank": f"{info['rank']}/{d_in}", "iters": iters,
        "lbfgs_s": lbfgs_seconds, "closed_s": closed_seconds, "solve_s": solve_seconds,
        "speedup": lbfgs_seconds / closed_seconds,
        "lbfgs_rel": lbfgs_objective / stats.energy, "ours_rel": info["objective"] / stats.energy,
        "objective_ratio": info["objective"] / lbfgs_objective,
        "norm_ratio": info["delta_norm"] / lbfgs_norm,
        "matched_objective_ratio": fs.objective(stats, matched) / lbfgs_objective,
        "matched_norm_ratio": float(matched.double().norm()) / lbfgs_norm,
        "pinv_norm_ratio": pinv_norm / lbfgs_norm,
    }


def layer_plan(quick):
    spatial_rows = {320: 1024, 640: 512, 1280: 256} if quick else {320: 5120, 640: 2048, 1280: 1024}
    widths = (320,) if quick else (320, 640, 1280)
    plan = [("text encoder 768 (fc-like)", lambda g: text_layer_inputs(g), 768, 500),
            ("cross-attn k/v 768->320", lambda g: kv_layer_inputs(g), 320, 500)]
    plan += [(f"spatial {w} ({CONCEPTS}x{spatial_rows[w]} rows)",
              lambda g, w=w: spatial_layer_inputs(g, w, spatial_rows[w]), w, 50) for w in widths]
    return plan


def markdown_table(results):
    header = ("| layer | W shape | rows | rank G | L-BFGS iters | L-BFGS s | closed form s (solve s) | speed-up "
              "| f/f(W0) L-BFGS | f/f(W0) ours | f ours / f L-BFGS | ‖D‖ ours / ‖D‖ L-BFGS "
              "| at f = f L-BFGS: ‖D‖ ratio | pinv ‖D‖ / ‖D‖ L-BFGS |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['rows']} | {r['rank']} | {r['iters']} | {r['lbfgs_s']:.2f} "
            f"| {r['closed_s']:.3f} ({r['solve_s']:.3f}) | {r['speedup']:.0f}x | {r['lbfgs_rel']:.2e} "
            f"| {r['ours_rel']:.2e} | {r['objective_ratio']:.3f} | {r['norm_ratio']:.3f} "
            f"| {r['matched_norm_ratio']:.3f} | {r['pinv_norm_ratio']:.3g} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="spatial 320 only, fewer rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'QUICK (spatial 320 only, 1024 rows/concept)' if args.quick else 'full'} run, seed {args.seed}")
    results = []
    for name, make_inputs, d_out, iters in layer_plan(args.quick):
        results.append(bench_layer(name, make_inputs(gen), d_out, iters, gen))
        print(f"  done: {name}", flush=True)
    print()
    print(markdown_table(results))
    print("\nclosed form = GramAccumulator over the rows + LayerStats.from_lora + solve(tolerance=1e-3), median of 3;"
          " 'at f = f L-BFGS' = solve_to_objective(L-BFGS objective); objectives in float64 from the stats.")


if __name__ == "__main__":
    main()
