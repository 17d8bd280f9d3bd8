"""Gradient Fuse on the tiny 16-layer model: identity, memory and incremental fusion.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fusion.py [--quick] [--identity-drift-only]

Everything runs on the harness's tiny SD1.5-topology model (32-channel UNet, 2-layer 768-wide
CLIP) on CPU with one torch thread, with seeded random ED-LoRAs (text_lora_scale 0.05,
embedding_scale 0.3) and a small capture (64 px, 2 steps unless stated).
  0. Identity and drift, end to end (the numbers users care about): three concepts fused by the
     default λ rule (match_lbfgs), the old τ rule (1e-3), weight averaging, Custom Diffusion, and an
     L-BFGS fusion with the original's settings (torch.optim.LBFGS in float32 from W0, history 25,
     strong Wolfe, 500/500/50 iterations for text / k/v / other layers) on the same captured Grams,
     stage by stage like the others. Per concept, the denoised predictions x0 of a 4-step sampling
     run (no CFG, 64 px, fixed seed) of the fused model vs that concept's own single-ED-LoRA model
     (α 1), on its own prompts (cond branch) and on the empty negative prompt (uncond branch), each
     model with its own text encoder: ‖fused − single‖ / ‖single‖; drift: fused vs base model on
     prompts without concept words, ‖fused − base‖ / ‖base‖.
  1. Identity: per concept, the relative error of the fused model vs that concept's single
     ED-LoRA model, (a) of the UNet output of the concept's capture-style sampling run, relative
     to what the concept changes in that run, and (b) of the cross-attention k/v outputs on the
     concept's tokens and end token, relative to its k/v LoRA change on those rows.
  2. Memory: peak RSS growth during one gradient fusion (psutil sampling, a fresh process per
     configuration) vs the fp16 bytes the original would store (every fused layer's inputs and
     outputs for every captured row).
  3. Incremental: wall time to add one concept to saved statistics vs fusing all from scratch.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _bootstrap  # noqa: E402

_bootstrap.add_host(cpu=True)

import psutil  # noqa: E402
import torch  # noqa: E402

import comfy.sample  # noqa: E402

from comfyui_mixofshow.harness import models  # noqa: E402
from comfyui_mixofshow.harness.fusion_checks import (  # noqa: E402
    CAPTURE, capture_sample, loaded_weights, relative_error, seeded_concepts)
from comfyui_mixofshow.mixofshow_core import fusion_solver, sd15  # noqa: E402
from comfyui_mixofshow.nodes import gradient_fuse  # noqa: E402
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora  # noqa: E402
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise  # noqa: E402
from comfyui_mixofshow.nodes.fusion_capture import kv_inputs  # noqa: E402
from comfyui_mixofshow.nodes.gradient_fuse import fuse  # noqa: E402
from comfyui_mixofshow.nodes.model_keys import clip_weight_keys, unet_weight_keys  # noqa: E402

METHODS = {"gradient, k/v all": dict(method="gradient", kv_positions="all"),
           "gradient, k/v concept_and_eos": dict(method="gradient", kv_positions="concept_and_eos"),
           "weight_average": dict(method="weight_average"),
           "custom_diffusion": dict(method="custom_diffusion")}
STAGES = ("text_encoder", "k/v", "other UNet")
FP16_BYTES = 2


RULE_ROWS = {"match_lbfgs (default)": dict(method="gradient", tolerance=None),
             "tolerance 1e-3 (old default)": dict(method="gradient", tolerance=1e-3),
             "weight average": dict(method="weight_average"),
             "Custom Diffusion": dict(method="custom_diffusion")}
LBFGS_ROW = "L-BFGS, original settings"
OWN_PROMPTS = ("photo of a {}", "{}", "a {} in the garden")
PLAIN_PROMPTS = ("photo of a dog", "a red car on a street", "")
X0_STEPS = 4


def x0_predictions(model, clip, prompt, seed):
    """The denoised predictions x0 of every step of a seeded, CFG-free sampling run [steps, ...]."""
    cond = encode_layerwise(clip, prompt)
    size = CAPTURE["capture_resolution"] // 8
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, size, size), seed)
    seen = []
    comfy.sample.sample(model, noise, X0_STEPS, 1.0, "dpmpp_2m", "normal", cond, cond, torch.zeros_like(noise),
                        seed=seed, callback=lambda step, x0, x, total: seen.append(x0.clone()), disable_pbar=True)
    return torch.stack(seen)


class GramLBFGS:
    """solve_layer replacement: the original's L-BFGS (float32, from W0, history 25, strong Wolfe,
    ORIGINAL_ITERATIONS) on the layer's Gram objective. With G = QΛQᵀ the objective is
    ‖X̃ Wᵀ − Ỹ‖² + f* for the rank rows X̃ = Λ^½Qᵀ, Ỹ = X̃ W0ᵀ + Λ^-½ R̃ᵀ (the same f as the captured
    rows, without the float32 cancellation of c − 2tr(DRᵀ) + tr(DGDᵀ)), divided by the captured
    rows' N = rows·d_out as F.mse_loss does."""

    def __init__(self, base_weights):
        self.base_weights = base_weights   # layer name -> W0 [d_out, d_in]

    def __call__(self, name, stats, tolerance, kv_positions, eigh=None):
        spectrum = fusion_solver._spectrum(stats, fusion_solver.DEFAULT_RCOND)
        w0 = self.base_weights[name].double()
        rows = spectrum.eigvals.sqrt()[:, None] * spectrum.basis.T
        targets = rows @ w0.T + (spectrum.rhs_rot / spectrum.eigvals.sqrt()).T
        optimum = max(stats.energy - spectrum.reducible, 0.0)
        iterations = gradient_fuse.ORIGINAL_ITERATIONS[gradient_fuse.layer_stage(name)]
        # ComfyUI runs nodes in inference mode, whose tensors autograd cannot save: fresh copies
        with torch.inference_mode(False), torch.enable_grad():
            x, y, start = rows.float().clone(), targets.float().clone(), w0.float().clone()
            weight = start.clone().requires_grad_(True)
            optimizer = torch.optim.LBFGS([weight], lr=1, max_iter=iterations, history_size=25,
                                          line_search_fn="strong_wolfe", tolerance_grad=1e-16, tolerance_change=1e-16)
            mean_over, best = max(stats.rows, 1) * stats.d_out, {"loss": math.inf, "weight": start.clone()}

            def closure():
                optimizer.zero_grad()
                loss = (((x @ weight.T - y) ** 2).sum() + optimum) / mean_over
                loss.backward()
                if loss.item() < best["loss"]:
                    best["loss"], best["weight"] = loss.item(), weight.detach().clone()
                return loss

            optimizer.step(closure)
        return best["weight"] - start


def lbfgs_fusion(model, clip, concepts):
    """Gradient Fuse with every layer solved by GramLBFGS."""
    base = {}
    for part, patcher, keys in ((gradient_fuse.TEXT, clip.patcher, clip_weight_keys(clip)),
                                (gradient_fuse.UNET, model, unet_weight_keys(model))):
        weights = loaded_weights(patcher)
        base.update({f"{part}:{path}": weights[key].reshape(weights[key].shape[0], -1)
                     for path, key in keys.items() if key in weights})
    saved = gradient_fuse.solve_layer
    gradient_fuse.solve_layer = GramLBFGS(base)
    try:
        return fuse(model, clip, concepts, "gradient", **CAPTURE)[:2]
    finally:
        gradient_fuse.solve_layer = saved


def relative(a, b):
    return float((a - b).norm() / b.norm())


def identity_and_drift(model, clip, count=3):
    """{row: (cond errors per concept, uncond errors per concept, drift per plain prompt)}."""
    concepts = seeded_concepts(model, clip, count)
    fused = {name: fuse(model, clip, concepts, **options, **CAPTURE)[:2] for name, options in RULE_ROWS.items()}
    fused[LBFGS_ROW] = lbfgs_fusion(model, clip, concepts)
    results = {name: ([], [], []) for name in fused}
    scale = []
    for index, concept in enumerate(concepts):
        single = apply_edlora(model, clip, concept.edlora, 1.0, 1.0)
        seed = CAPTURE["seed"] + index
        for prompts, slot in ((OWN_PROMPTS, 0), (("",), 1)):
            for prompt in prompts:
                text = prompt.format(" ".join(concept.words)) if "{}" in prompt else prompt
                expected = x0_predictions(*single, text, seed)
                if slot == 0:
                    scale.append(relative(x0_predictions(model, clip, text.replace(" ".join(concept.words), "thing"), seed),
                                          expected))
                for name, pair in fused.items():
                    results[name][slot].append(relative(x0_predictions(*pair, text, seed), expected))
    for index, prompt in enumerate(PLAIN_PROMPTS):
        expected = x0_predictions(model, clip, prompt, CAPTURE["seed"] + index)
        for name, pair in fused.items():
            results[name][2].append(relative(x0_predictions(*pair, prompt, CAPTURE["seed"] + index), expected))
    return results, statistics.mean(scale)


def print_identity_and_drift(results, scale, count=3):
    print(f"\n### Identity and drift, end to end ({count} concepts, x0 of {X0_STEPS} sampling steps, lower is better)\n")
    print("| fusion | identity, cond: own prompts vs single ED-LoRA (mean, max) | identity, uncond: empty prompt "
          "(mean, max) | drift: plain prompts vs base (mean, max) |")
    print("|---|---|---|---|")
    for name, columns in results.items():
        print(f"| {name} | " + " | ".join(f"{statistics.mean(c):.4f}, {max(c):.4f}" for c in columns) + " |")
    print(f"\nscale: the base model with the concept words replaced by 'thing' is {scale:.3f} from the single "
          f"ED-LoRA model on the same prompts (mean).")
    default, lbfgs = results["match_lbfgs (default)"], results[LBFGS_ROW]
    checks = [statistics.mean(d) <= statistics.mean(l) for d, l in zip(default, lbfgs)]
    print("default (match_lbfgs) at least as good as the original-settings L-BFGS fusion (means): "
          + ", ".join(f"{label} {'yes' if ok else 'NO'}" for label, ok in zip(("cond", "uncond", "drift"), checks)))


def kv_error(model, fused, single, base, concept):
    """(end to end, layer fit alone) k/v errors over all 32 k/v layers on the concept's token and
    end-token rows: ‖fused k/v − single k/v‖ / ‖single k/v − W0 k/v‖, end to end with each model's
    own text encoder, the layer fit alone with the fused encoder's rows for both."""
    (fused_model, fused_clip), (single_model, single_clip) = fused, single
    fused_rows = kv_inputs(fused_clip, concept.words, "concept_and_eos")
    single_rows = kv_inputs(single_clip, concept.words, "concept_and_eos")
    fused_w, single_w = loaded_weights(fused_model), loaded_weights(single_model)
    sums = [[0.0, 0.0], [0.0, 0.0]]
    for path, key in unet_weight_keys(model).items():
        if not path.endswith((".attn2.to_k", ".attn2.to_v")):
            continue
        layer = sd15.cross_attention_index(path)
        got = fused_rows[layer] @ fused_w[key].T
        for total, rows in zip(sums, (single_rows[layer], fused_rows[layer])):
            expected = rows @ single_w[key].T
            total[0] += float((got - expected).square().sum())
            total[1] += float((expected - rows @ base[key].T).square().sum())
    return tuple((error / change) ** 0.5 for error, change in sums)


def identity(model, clip, count):
    """{method: [(UNet error, k/v error, k/v layer-fit error) per concept]} for `count` concepts."""
    concepts = seeded_concepts(model, clip, count)
    fused = {name: fuse(model, clip, concepts, **options, **CAPTURE)[:2] for name, options in METHODS.items()}
    base = loaded_weights(model)
    errors = {name: [] for name in METHODS}
    for index, concept in enumerate(concepts):
        single = apply_edlora(model, clip, concept.edlora, 1.0, 1.0)
        expected = capture_sample(*single, concept.words, index)
        plain = capture_sample(model, clip, [], index)
        for name, pair in fused.items():
            unet = relative_error(capture_sample(*pair, concept.words, index), expected, plain)
            errors[name].append((unet, *kv_error(model, pair, single, base, concept)))
    return errors


def print_identity(results):
    print("\n### Identity (relative error vs each concept's single ED-LoRA model; lower is better)\n")
    print("| concepts | method | UNet output, per concept | k/v outputs, per concept | mean UNet | mean k/v | "
          "mean k/v, layer fit alone |")
    print("|---|---|---|---|---|---|---|")
    for count, errors in results.items():
        for name, triples in errors.items():
            unet, kv, fit = ([t[i] for t in triples] for i in range(3))
            print(f"| {count} | {name} | {' / '.join(f'{e:.3f}' for e in unet)} | "
                  f"{' / '.join(f'{e:.3f}' for e in kv)} | {statistics.mean(unet):.3f} | {statistics.mean(kv):.3f} | "
                  f"{statistics.mean(fit):.3f} |")
    print("\nGradient fusion beats weight averaging by (mean over concepts of weight_average error / gradient error):\n")
    print("| concepts | gradient k/v all: UNet | k/v | gradient concept_and_eos: UNet | k/v |")
    print("|---|---|---|---|---|")
    for count, errors in results.items():
        ratios = [statistics.mean(a[i] / g[i] for a, g in zip(errors["weight_average"], errors[name]))
                  for name in ("gradient, k/v all", "gradient, k/v concept_and_eos") for i in (0, 1)]
        print(f"| {count} | " + " | ".join(f"{r:.1f}×" for r in ratios) + " |")


class PeakRSS:
    """Peak resident set size above the value on entry, sampled every 2 ms in a thread."""

    def __enter__(self):
        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self):
        return self.peak - self.start


def stage_of(name):
    if name.startswith("text_encoder:"):
        return "text_encoder"
    return "k/v" if name.endswith((".attn2.to_k", ".attn2.to_v")) else "other UNet"


def stored_bytes(stats):
    """{stage: fp16 bytes of every fused layer's captured inputs and outputs} (what the original keeps)."""
    out = dict.fromkeys(STAGES, 0)
    for name, layer in stats.layers.items():
        out[stage_of(name)] += layer.rows * (layer.d_in + layer.d_out) * FP16_BYTES
    return out


def memory_child(count, steps):
    """Runs in a fresh process: one gradient fusion, printed as JSON."""
    model, clip = models.tiny_model(), models.tiny_clip()
    concepts = seeded_concepts(model, clip, count)
    loaded_weights(model)  # the base model is loaded before measuring
    with PeakRSS() as peak:
        stats = fuse(model, clip, concepts, "gradient", **dict(CAPTURE, capture_steps=steps))[2]
    print(json.dumps({"peak": peak.growth, "stored": stored_bytes(stats)}))


# glibc raises its mmap threshold after the first large free, so later Grams land on the heap,
# whose freed chunks stay resident: a fixed threshold shows what the fusion itself holds
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_memory(count, steps):
    """(result with glibc's default allocator, peak growth with a fixed mmap threshold)."""
    command = [sys.executable, __file__, "--memory-child", str(count), str(steps)]
    results = []
    for extra in ({}, FIXED_MMAP_THRESHOLD):
        done = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **extra})
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results[0], results[1]["peak"]


def print_memory(rows):
    mib = 2 ** 20
    print("\n### Memory of gradient fusion (fresh process per row)\n")
    print("| concepts | capture steps | peak RSS growth (MiB) | same, fixed mmap threshold (MiB) | original's "
          "stored activations, fp16 (MiB): text encoder / k/v / other UNet / total | stored / peak |")
    print("|---|---|---|---|---|---|")
    for (count, steps), (result, fixed_peak) in rows.items():
        stored = result["stored"]
        total = sum(stored.values())
        parts = " / ".join(f"{stored[s] / mib:.1f}" for s in STAGES)
        print(f"| {count} | {steps} | {result['peak'] / mib:.1f} | {fixed_peak / mib:.1f} | {parts} / "
              f"{total / mib:.1f} | {total / max(result['peak'], 1):.2f} |")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def incremental(model, clip, count):
    """(seconds to add concept count+1 to the statistics of `count`, seconds to fuse all from scratch)."""
    concepts = seeded_concepts(model, clip, count + 1)
    first_model, first_clip, stats = fuse(model, clip, concepts[:count], "gradient", **CAPTURE)
    added, _ = timed(lambda: fuse(first_model, first_clip, concepts[count:], "gradient", previous=stats, **CAPTURE))
    scratch, _ = timed(lambda: fuse(model, clip, concepts, "gradient", **CAPTURE))
    return added, scratch


def print_incremental(rows):
    print(f"\n### Incremental fusion (gradient, {CAPTURE['capture_steps']} capture steps)\n")
    print("| fused concepts | add 1 to saved statistics (s) | all N+1 from scratch (s) | speed-up |")
    print("|---|---|---|---|")
    for count, (added, scratch) in rows.items():
        print(f"| {count} → {count + 1} | {added:.2f} | {scratch:.2f} | {scratch / added:.1f}× |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations (about 3 minutes)")
    parser.add_argument("--identity-drift-only", action="store_true", help="only the identity and drift table")
    parser.add_argument("--memory-child", nargs=2, type=int, metavar=("CONCEPTS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    with torch.inference_mode():
        if args.memory_child:
            return memory_child(*args.memory_child)
        run(args.quick, args.identity_drift_only)


def run(quick, identity_drift_only=False):
    start = time.perf_counter()
    model, clip = models.tiny_model(), models.tiny_clip()
    identity_counts = (2, 3) if quick else (2, 3, 4)
    memory_counts = (1, 2, 4) if quick else (1, 2, 4, 8)
    memory_steps = (2, 8) if quick else (2, 8, 20)
    incremental_counts = (2,) if quick else (2, 4)
    print(f"tiny SD1.5-topology model (harness.models.tiny_model/tiny_clip), CPU, torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, capture "
          f"{CAPTURE['capture_resolution']} px / {CAPTURE['capture_steps']} steps / seed {CAPTURE['seed']}"
          f"{', --quick' if quick else ''}")
    print_identity_and_drift(*identity_and_drift(model, clip))
    if identity_drift_only:
        print(f"\ntotal {time.perf_counter() - start:.0f} s")
        return
    print_identity({n: identity(model, clip, n) for n in identity_counts})
    configs = [(n, CAPTURE["capture_steps"]) for n in memory_counts] + [(2, s) for s in memory_steps if s != 2]
    print_memory({config: measure_memory(*config) for config in configs})
    print_incremental({n: incremental(model, clip, n) for n in incremental_counts})
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
