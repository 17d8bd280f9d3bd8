"""Per-layer dominance of the λ rules over the original's L-BFGS, on layers captured from a real fusion.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fusion_layers.py [--per-stage N] [--float64 N]

Runs Gradient Fuse (gradient, default settings, 64 px / 2 capture steps) with three seeded ED-LoRAs on
the harness's tiny SD1.5-topology model (2-layer 768-wide CLIP, 32-channel UNet) and keeps, for every
fused layer, each concept's captured input rows X_i and its α·ΔW_i. Per layer it then runs the
original's solve on exactly those rows (fusion_solver.lbfgs_reference: torch.optim.LBFGS in float32,
history 25, strong Wolfe, 500 iterations for text and k/v layers, 50 for the others, from W0 on
F.mse_loss over the rows with targets X_i (W0 + ΔW_i)ᵀ, lowest loss kept) and compares, on the
Gram statistics of the same rows (objective in float64). Text layers (3 x 2464 rows of 768) take
minutes each that way, so unless --text-on-rows they run the same L-BFGS on the Gram's rank rows
(bench_fusion.GramLBFGS: the identical objective, rows X̃ = Λ^½Qᵀ, float32, from W0):

    match_lbfgs        the default rule (frontier point at the replayed L-BFGS objective)
    1-row replay       the previous version of that rule (one coordinate per eigenvalue)
    tolerance 1e-3     the τ rule

A rule dominates L-BFGS on a layer when its objective ≤ L-BFGS's and ‖ΔW‖ ≤ L-BFGS's. `--per-stage N`
takes the first N layers of each stage (default: all; text layers cost ~10-40 s of L-BFGS each);
`--float64 N` also runs L-BFGS in float64 on the rows of the first N layers of each stage (not text
layers run on the Gram's rows).
"""
import argparse
import math
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _bootstrap  # noqa: E402

_bootstrap.add_host(cpu=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_fusion import GramLBFGS  # noqa: E402
from comfyui_mixofshow.harness import models  # noqa: E402
from comfyui_mixofshow.harness.fusion_checks import CAPTURE, loaded_weights, seeded_concepts  # noqa: E402
from comfyui_mixofshow.mixofshow_core import fusion_solver as fs  # noqa: E402
from comfyui_mixofshow.mixofshow_core.spectral_lbfgs import lbfgs_excess  # noqa: E402
from comfyui_mixofshow.nodes import fusion_capture, gradient_fuse  # noqa: E402

STAGES = ("text", "kv", "spatial")


class RowKeepingAccumulator(fs.GramAccumulator):
    """A GramAccumulator that also keeps the rows (the benchmark needs them for L-BFGS)."""

    def add(self, x):
        super().add(x)
        self.kept = getattr(self, "kept", []) + [x.detach().reshape(-1, self.d_in).float().clone()]


def captured_layers(count=3):
    """{layer name: {"w0", "xs", "deltas"}} of one gradient fusion of `count` seeded concepts."""
    record = {}
    stage_add = gradient_fuse.Stage.add

    def add(stage, concept, grams):
        for path in stage.paths:
            delta = gradient_fuse.concept_delta(concept, stage.part, path, stage.fusion.shape(stage.part, path))
            record.setdefault(f"{stage.part}:{path}", []).append((torch.cat(grams[path].kept), delta.float()))
        return stage_add(stage, concept, grams)

    patched = [(gradient_fuse, "GramAccumulator"), (fusion_capture, "GramAccumulator"), (gradient_fuse.Stage, "add")]
    saved = [getattr(owner, name) for owner, name in patched]
    for (owner, name), value in zip(patched, (RowKeepingAccumulator, RowKeepingAccumulator, add)):
        setattr(owner, name, value)
    try:
        model, clip = models.tiny_model(), models.tiny_clip()
        concepts = seeded_concepts(model, clip, count)
        weights = {gradient_fuse.TEXT: loaded_weights(clip.patcher), gradient_fuse.UNET: loaded_weights(model)}
        keys = {gradient_fuse.TEXT: gradient_fuse.clip_weight_keys(clip), gradient_fuse.UNET: gradient_fuse.unet_weight_keys(model)}
        gradient_fuse.fuse(model, clip, concepts, "gradient", **CAPTURE)
    finally:
        for (owner, name), value in zip(patched, saved):
            setattr(owner, name, value)
    out = {}
    for name, pairs in record.items():
        part, path = name.split(":", 1)
        w0 = weights[part][keys[part][path]]
        out[name] = {"w0": w0.reshape(w0.shape[0], -1).float(), "xs": [x for x, _ in pairs],
                     "deltas": [d for _, d in pairs]}
    return out


def lbfgs_float64(xs, targets, w0, iters):
    """lbfgs_reference's run in float64 (same settings)."""
    x, y = torch.cat(xs).double(), torch.cat(targets).double()
    weight = w0.double().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1, max_iter=iters, history_size=25, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-16, tolerance_change=1e-16)
    best = {"loss": math.inf, "weight": weight.detach().clone()}

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(x @ weight.T, y)
        loss.backward()
        if loss.item() < best["loss"]:
            best["loss"], best["weight"] = loss.item(), weight.detach().clone()
        return loss

    optimizer.step(closure)
    return best["weight"]


def one_row_replay(stats, iters):
    """The previous rule: the replay with one coordinate per (pooled) eigenvalue."""
    spectrum = fs._spectrum(stats, fs.DEFAULT_RCOND)
    mean_over = stats.rows * stats.d_out
    first_l1 = float(torch.tensor(2.0 * float(stats.rhs.abs().sum()) / mean_over, dtype=torch.float32))
    eigvals, weights = fs.binned_measure(spectrum)
    share = lbfgs_excess(eigvals, weights, mean_over, first_l1, iters) / float(np.sum(weights / eigvals))
    return fs.solve_to_objective(stats, stats.energy - spectrum.reducible + share * spectrum.reducible)[0]


def compare_layer(name, layer, stage, with_float64, on_rows):
    w0, xs, deltas = layer["w0"], layer["xs"], layer["deltas"]
    iters = gradient_fuse.ORIGINAL_ITERATIONS[stage]
    stats = sum(fs.LayerStats.from_concept(x.double().T @ x.double(), d) for x, d in zip(xs, deltas))
    stats.rows = sum(x.shape[0] for x in xs)
    targets = [x @ (w0 + d).T for x, d in zip(xs, deltas)]
    start = time.process_time()
    if on_rows:
        w32, _ = fs.lbfgs_reference(xs, targets, w0, iters)
    else:
        w32 = w0 + GramLBFGS({name: w0})(name, stats, None, "all")
    lbfgs_cpu = time.process_time() - start
    reference = (fs.objective(stats, w32 - w0), float((w32 - w0).double().norm()))
    start = time.process_time()
    default = fs.solve_like_lbfgs(stats, iters)[0]
    rule_cpu = time.process_time() - start
    rules = {"match_lbfgs": default, "1-row replay": one_row_replay(stats, iters),
             "tolerance 1e-3": fs.solve(stats, 1e-3)[0]}
    if with_float64 and on_rows:
        w64 = lbfgs_float64(xs, targets, w0, iters)
        rules["L-BFGS float64"] = (w64 - w0.double()).float()
    ratios = {name: (fs.objective(stats, change) / reference[0], float(change.double().norm()) / reference[1])
              for name, change in rules.items()}
    return {"ratios": ratios, "lbfgs_cpu": lbfgs_cpu, "rule_cpu": rule_cpu}


def dominates(ratio):
    return ratio[0] <= 1.0 + 1e-9 and ratio[1] <= 1.0


def report(results):
    rules = ["match_lbfgs", "1-row replay", "tolerance 1e-3", "L-BFGS float64"]
    print("\n### Per layer: objective / L-BFGS float32's  and  ‖ΔW‖ / L-BFGS float32's\n")
    print("| stage | layer | " + " | ".join(rules) + " | L-BFGS CPU s | match_lbfgs CPU s |")
    print("|---|---|" + "---|" * len(rules) + "---|---|")
    for (stage, name), r in results.items():
        cells = [f"{r['ratios'][k][0]:.4f} / {r['ratios'][k][1]:.3f}" if k in r["ratios"] else "" for k in rules]
        print(f"| {stage} | {name.split(':', 1)[1]} | " + " | ".join(cells)
              + f" | {r['lbfgs_cpu']:.2f} | {r['rule_cpu']:.3f} |")
    print("\n### Layers on which the rule dominates L-BFGS float32 (objective ≤ and ‖ΔW‖ ≤)\n")
    print("| rule | " + " | ".join(STAGES) + " | all |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for rule in rules:
        counts = []
        for stage in STAGES + ("all",):
            rows = [r for (s, _), r in results.items() if (stage == "all" or s == stage) and rule in r["ratios"]]
            won = sum(dominates(r["ratios"][rule]) for r in rows)
            counts.append(f"{won}/{len(rows)} ({100 * won / max(len(rows), 1):.0f} %)")
        print(f"| {rule} | " + " | ".join(counts) + " |")
    cpu = [sum(r[k] for r in results.values()) for k in ("lbfgs_cpu", "rule_cpu")]
    print(f"\nCPU seconds over all layers: L-BFGS float32 {cpu[0]:.1f}, match_lbfgs rule {cpu[1]:.1f} "
          f"(eigh + replay + frontier, from the statistics)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-stage", type=int, default=None, help="first N layers of each stage (default all)")
    parser.add_argument("--float64", type=int, default=0, help="also L-BFGS in float64 on the first N per stage")
    parser.add_argument("--text-on-rows", action="store_true", help="text layers' L-BFGS on the captured rows too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with torch.inference_mode():
        layers = captured_layers()
    by_stage = {stage: [n for n in sorted(layers) if gradient_fuse.layer_stage(n) == stage] for stage in STAGES}
    print(f"captured {len(layers)} layers ({', '.join(f'{s} {len(n)}' for s, n in by_stage.items())}) from a "
          f"3-concept fusion on the tiny model, {CAPTURE['capture_resolution']} px / {CAPTURE['capture_steps']} steps; "
          f"torch {torch.__version__}, 1 thread")
    results = {}
    for stage, names in by_stage.items():
        for index, name in enumerate(names[:args.per_stage]):
            on_rows = stage != "text" or args.text_on_rows
            results[(stage, name)] = compare_layer(name, layers[name], stage, index < args.float64, on_rows)
            print(f"  done: {name}", flush=True)
    report(results)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
