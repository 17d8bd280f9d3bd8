"""Gradient Fuse on the tiny 16-layer model: identity, memory and incremental fusion.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fusion.py [--quick]

Everything runs on the harness's tiny SD1.5-topology model (32-channel UNet, 2-layer 768-wide
CLIP) on CPU with one torch thread, with seeded random ED-LoRAs (text_lora_scale 0.05,
embedding_scale 0.3) and a small capture (64 px, 2 steps unless stated).
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

from comfyui_mixofshow.harness import models  # noqa: E402
from comfyui_mixofshow.harness.fusion_checks import (  # noqa: E402
    CAPTURE, capture_sample, loaded_weights, relative_error, seeded_concepts)
from comfyui_mixofshow.mixofshow_core import sd15  # noqa: E402
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora  # noqa: E402
from comfyui_mixofshow.nodes.fusion_capture import kv_inputs  # noqa: E402
from comfyui_mixofshow.nodes.gradient_fuse import fuse  # noqa: E402
from comfyui_mixofshow.nodes.model_keys import unet_weight_keys  # noqa: E402

METHODS = {"gradient, k/v all": dict(method="gradient", kv_positions="all"),
           "gradient, k/v concept_and_eos": dict(method="gradient", kv_positions="concept_and_eos"),
           "weight_average": dict(method="weight_average"),
           "custom_diffusion": dict(method="custom_diffusion")}
STAGES = ("text_encoder", "k/v", "other UNet")
FP16_BYTES = 2


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
    parser.add_argument("--memory-child", nargs=2, type=int, metavar=("CONCEPTS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    with torch.inference_mode():
        if args.memory_child:
            return memory_child(*args.memory_child)
        run(args.quick)


def run(quick):
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
    print_identity({n: identity(model, clip, n) for n in identity_counts})
    configs = [(n, CAPTURE["capture_steps"]) for n in memory_counts] + [(2, s) for s in memory_steps if s != 2]
    print_memory({config: measure_memory(*config) for config in configs})
    print_incremental({n: incremental(model, clip, n) for n in incremental_counts})
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
