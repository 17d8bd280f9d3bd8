"""Cost of Gradient Fuse on a full-size SD1.5 (seeded random weights, fp32, CPU), ours vs the original's L-BFGS.

    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/bench_fusion_cost.py [--tiny] [--lbfgs-layers N]

One process, one run (the numbers below come from the same run):
  1. Gram-capture overhead of one 512 px sampling step (the whole UNet, batch 1): the step without
     hooks and with the spatial capture's hooks, median of 2.
  2. Gradient Fuse, three seeded ED-LoRAs (rank 4), 20 capture steps at 128 px, default rule:
     process CPU seconds and wall seconds of the whole fusion, and peak RSS (sampled every 2 ms)
     against the RSS of the loaded model.
  3. The .fusionstats file of that fusion (format 2) against format 1's dense float64 layout.
  4. The original's solve on the same captured statistics: torch.optim.LBFGS with its settings
     (float32, history 25, strong Wolfe, 500 / 500 / 50 iterations) on the first N layers of each
     stage (GramLBFGS of bench_fusion.py), timed per layer and extrapolated to all layers of the stage.
`--tiny` runs the same on the 32-channel test model (seconds; checks the script).
"""
import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import _bootstrap  # noqa: E402

_bootstrap.add_host(cpu=True)

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from bench_fusion import GramLBFGS, PeakRSS  # noqa: E402
from comfyui_mixofshow.harness import models  # noqa: E402
from comfyui_mixofshow.harness.fusion_checks import seeded_concepts  # noqa: E402
from comfyui_mixofshow.mixofshow_core import sd15  # noqa: E402
from comfyui_mixofshow.mixofshow_core.fusion_stats import save_fusion_stats  # noqa: E402
from comfyui_mixofshow.nodes import gradient_fuse  # noqa: E402
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise  # noqa: E402
from comfyui_mixofshow.nodes.fusion_capture import GramHooks, unet_modules  # noqa: E402
from comfyui_mixofshow.nodes.model_keys import clip_weight_keys, unet_weight_keys  # noqa: E402

FULL_UNET = dict(models.TINY_UNET, model_channels=320)
FULL_CLIP_LAYERS = 12
GIB = 2 ** 30


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def build(tiny):
    if tiny:
        return models.tiny_model(), models.tiny_clip()
    models.TINY_CLIP["num_hidden_layers"] = FULL_CLIP_LAYERS
    return models.unet_model(FULL_UNET), models.tiny_clip()


def one_step(model, cond, resolution, hooks):
    size = resolution // 8
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, size, size), 0)
    with Clock() as clock:
        with hooks():
            comfy.sample.sample(model, noise, 1, 1.0, "euler", "normal", cond, cond, torch.zeros_like(noise), seed=0,
                                disable_pbar=True)
    return clock.wall


def capture_overhead(model, clip, concepts, resolution):
    """{variant: median wall seconds of one sampling step}."""
    paths = sorted(gradient_fuse.fused_layers(concepts)["spatial"])
    key_of = unet_weight_keys(model)
    cond = encode_layerwise(clip, "photo of a dog")
    distinct = unet_modules(model, sorted({sd15.input_group(p) for p in paths}), key_of)

    variants = {"no hooks": _Nothing, "Gram hooks (float64 Gram per distinct input, rows promoted in blocks)":
                lambda: GramHooks(distinct)}
    one_step(model, cond, resolution, variants["no hooks"])   # warm-up: loads the model
    return {name: statistics.median(one_step(model, cond, resolution, v) for _ in range(2))
            for name, v in variants.items()}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def fusion_cost(model, clip, concepts, resolution, steps):
    """(Clock, peak RSS, statistics) of one default Gradient Fuse."""
    with PeakRSS() as peak, Clock() as clock:
        stats = gradient_fuse.fuse(model, clip, concepts, "gradient", capture_steps=steps,
                                   capture_resolution=resolution, seed=0, tolerance=None)[2]
    return clock, peak.peak, stats


def stats_sizes(stats):
    """(bytes of the format-2 file, bytes format 1 would take: dense float64 G and R per layer)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cost.fusionstats")
        save_fusion_stats(stats, path)
        written = os.path.getsize(path)
    return written, sum(8 * layer.d_in * (layer.d_in + layer.d_out) for layer in stats.layers.values())


def lbfgs_cost(model, clip, stats, per_stage):
    """{stage: (layers timed, CPU s per layer, layers in the stage)} of GramLBFGS on the fusion's statistics."""
    base = {}
    for part, patcher, keys in ((gradient_fuse.TEXT, clip.patcher, clip_weight_keys(clip)),
                                (gradient_fuse.UNET, model, unet_weight_keys(model))):
        weights = patcher.model.state_dict()   # the unpatched base weights, not copied
        base.update({f"{part}:{path}": weights[key].reshape(weights[key].shape[0], -1)
                     for path, key in keys.items() if key in weights})
    solver, out = GramLBFGS(base), {}
    for stage in ("text", "kv", "spatial"):
        names = sorted(n for n in stats.layers if gradient_fuse.layer_stage(n) == stage)
        # the largest layers of the stage (the spatial stage's cost grows with the width)
        names.sort(key=lambda n: -stats.layers[n].d_in * stats.layers[n].d_out)
        with Clock() as clock:
            for name in names[:per_stage]:
                solver(name, stats.layers[name], None, "all")
        timed = min(per_stage, len(names))
        out[stage] = (timed, clock.cpu / max(timed, 1), len(names))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--lbfgs-layers", type=int, default=2, help="layers per stage timed with L-BFGS")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.set_grad_enabled(False)
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {'tiny' if args.tiny else 'full-size SD1.5 (seeded random, fp32)'}")
    with torch.inference_mode():
        model, clip = build(args.tiny)
        concepts = seeded_concepts(model, clip, 3)
        comfy.model_management.load_models_gpu([model, clip.patcher])
        model_rss = psutil.Process().memory_info().rss
        overhead = capture_overhead(model, clip, concepts, 512)
        clock, peak, stats = fusion_cost(model, clip, concepts, 128, args.steps)
        lbfgs = lbfgs_cost(model, clip, stats, args.lbfgs_layers)
    base = overhead["no hooks"]
    print("\n### One 512 px sampling step (wall s, median of 2)\n")
    print("| hooks | s | overhead |")
    print("|---|---|---|")
    for name, seconds in overhead.items():
        print(f"| {name} | {seconds:.2f} | {100 * (seconds / base - 1):+.1f} % |")
    print(f"\n### Gradient Fuse, 3 concepts, {args.steps} capture steps at 128 px, default rule\n")
    print(f"CPU {clock.cpu:.0f} s, wall {clock.wall:.0f} s; RSS of the loaded model {model_rss / GIB:.2f} GiB, "
          f"peak {peak / GIB:.2f} GiB (+{(peak - model_rss) / GIB:.2f} GiB)")
    written, dense = stats_sizes(stats)
    print(f"\n.fusionstats: {written / 2 ** 20:.0f} MiB (format 2) vs {dense / 2 ** 20:.0f} MiB of dense float64 "
          f"G and R (format 1), {dense / written:.1f}x smaller")
    print("\n### The original's L-BFGS on the same statistics (CPU s, extrapolated per stage)\n")
    print("| stage | layers timed | CPU s per layer | layers | stage total (extrapolated) |")
    print("|---|---|---|---|---|")
    total = 0.0
    for stage, (timed, per_layer, count) in lbfgs.items():
        total += per_layer * count
        print(f"| {stage} | {timed} | {per_layer:.1f} | {count} | {per_layer * count:.0f} |")
    print(f"\nL-BFGS solve alone ≈ {total:.0f} CPU s (the largest layers were timed, so this is an upper estimate "
          f"for the spatial stage) vs our whole fusion {clock.cpu:.0f} CPU s: {total / clock.cpu:.1f}x")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
