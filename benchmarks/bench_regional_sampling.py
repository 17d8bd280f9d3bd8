"""Cost of regional sampling relative to plain sampling and to ComfyUI's masked conditioning.

    .venv/bin/python benchmarks/bench_regional_sampling.py [--quick] [--width 256 --height 128 --steps 4 --repeats 3]
    .venv/bin/python benchmarks/bench_regional_sampling.py --memory

--memory: peak memory instead of time, on the tiny model (32-channel TINY_UNET, 2-layer CLIP, a
seeded ED-LoRA so prompts carry 16 distinct layer encodings), all rows in one process:
- one regional sampling step (Apply Regions + one euler step, cfg 7.5, 64x64 pixels) against the
  length of a region prompt (two regions: a 3-chunk prompt and one of 1, 4, 16 chunks of 75
  tokens) and against the number of regions (1, 8, 32 one-chunk prompts, tiling the image); encodings are made
  beforehand, so a row measures what sampling adds;
- one EDLoRA Text Encode of a concept prompt of 1, 4, 16 chunks.
On a CPU the peak is the kernel's high-water mark of the process's resident set (Linux VmHWM,
reset at the start of each row) above the resident set at that start, with glibc's mmap
threshold fixed (the script re-executes itself with it) so freed tensors leave the resident set;
on CUDA it is torch's peak allocation.

Timing (the default):

One seeded random UNet (harness.models.CHECKPOINT_UNET: SD1.5 topology, 320 channels at every
level; --quick: the 32-channel TINY_UNET), one sampler, steps and resolution for every row:
- plain: KSampler's path (nodes.common_ksampler) with the global prompt and negative;
- regional, R regions: 'Apply Regions' + the same sampler path;
- SetMask, R regions: the global prompt and negative each combined (ConditioningCombine) with
  R copies masked (ConditioningSetMask) to the same boxes, holding the region prompt or negative.
Regions are R side-by-side strips over the lower 90% of the image. Texts are encoded once
beforehand (a 2-layer CLIP) for every row. All rows are measured in the same run, interleaved
per repeat after a one-step warm-up of each; the table prints medians. On a CPU the ratios use
the process's CPU time with one torch thread, which other jobs on the machine disturb far less
than wall time; on CUDA they use wall time. Target: 3 regions cost at most 1.25x plain.
"""
import argparse
import gc
import logging
import os
import statistics
import sys
import time

import torch

import _bootstrap

_bootstrap.add_host(cpu=not torch.cuda.is_available())

import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
import nodes as comfy_nodes  # noqa: E402

from comfyui_mixofshow.harness import models  # noqa: E402
from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora  # noqa: E402
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora  # noqa: E402
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise  # noqa: E402
from comfyui_mixofshow.nodes.region_prompt import RegionPrompt  # noqa: E402
from comfyui_mixofshow.nodes.regional_sampler import apply_regions  # noqa: E402

REGION_COUNTS = (1, 3, 5)
GLOBAL_PROMPT, GLOBAL_NEGATIVE = "a group of people in front of a castle, 4K", "blurry, lowres"
REGION_PROMPTS = ["a man in a red coat", "a woman in a blue dress", "a knight in armour", "a wizard with a staff",
                  "a girl with a yellow umbrella"]
REGION_NEGATIVE = "crop, deformed hands"
SAMPLER = dict(seed=14, cfg=7.5, sampler_name="euler", scheduler="normal")


def strip_boxes(count):
    """Normalized (x1, y1, x2, y2) boxes: `count` side-by-side strips over the lower 90%."""
    return [(i / count, 0.1, (i + 1) / count, 1.0) for i in range(count)]


def region_list(clip, boxes, width, height):
    regions = ()
    for prompt, box in zip(REGION_PROMPTS, boxes):
        regions = RegionPrompt().add_region(clip, prompt, REGION_NEGATIVE, ", ".join(map(str, box)), "normalized",
                                            width, height, 1.0, regions=regions)[0]
    return regions


def box_mask(box, width, height):
    """[1, H, W] pixel mask of a normalized box (the cells the regional patch uses at full resolution)."""
    x1, y1, x2, y2 = box
    mask = torch.zeros(1, height, width)
    mask[:, round(y1 * height):round(y2 * height), round(x1 * width):round(x2 * width)] = 1.0
    return mask


def set_mask_conditioning(base, region_texts, boxes, width, height):
    """ConditioningCombine(base, ConditioningSetMask(text_r, box_r) for every region)."""
    combined = base
    for text, box in zip(region_texts, boxes):
        masked = comfy_nodes.ConditioningSetMask().append(text, box_mask(box, width, height), "default", 1.0)[0]
        combined = comfy_nodes.ConditioningCombine().combine(combined, masked)[0]
    return combined


def sampler_run(model, positive, negative, latent):
    return lambda steps: comfy_nodes.common_ksampler(model, positive=positive, negative=negative, latent=latent,
                                                     steps=steps, **SAMPLER)


def regional_run(model, positive, negative, regions, latent):
    def run(steps):
        patched, region_positive, region_negative = apply_regions(model, positive, negative, regions)
        return comfy_nodes.common_ksampler(patched, positive=region_positive, negative=region_negative,
                                           latent=latent, steps=steps, **SAMPLER)
    return run


def set_mask_run(model, positive, negative, clip, boxes, latent, width, height):
    region_positive = [encode(clip, p) for p in REGION_PROMPTS[:len(boxes)]]
    region_negative = [encode(clip, REGION_NEGATIVE)] * len(boxes)

    def run(steps):
        masked_positive = set_mask_conditioning(positive, region_positive, boxes, width, height)
        masked_negative = set_mask_conditioning(negative, region_negative, boxes, width, height)
        return comfy_nodes.common_ksampler(model, positive=masked_positive, negative=masked_negative,
                                           latent=latent, steps=steps, **SAMPLER)
    return run


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def interleaved_medians(runs, steps, repeats):
    """{name: (median wall seconds, median CPU seconds)}; every run once per repeat, in turn,
    after a one-step warm-up of each."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run(1)
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run(steps)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: tuple(statistics.median(column) for column in zip(*values)) for name, values in times.items()}


# ---------------------------------------------------------------- memory

PROMPT_CHUNKS = (1, 4, 16)
MEMORY_REGION_COUNTS = (1, 8, 32)
OTHER_REGION_CHUNKS = 3
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def status_bytes(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakMemory:
    """Peak memory above the value on entry: torch's peak allocation on CUDA; on a CPU the
    kernel's resident-set high-water mark (VmHWM), reset on entry through /proc/self/clear_refs."""

    def __enter__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.start = status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = status_bytes("VmHWM")

    @property
    def growth_mib(self):
        return (self.peak - self.start) / 2 ** 20


def prompt_of_chunks(clip, chunks):
    """A concept prompt that the host tokenizer splits into exactly `chunks` chunks."""
    words = 75 * (chunks - 1) + 60
    text = "a photo of <c1> <c2>, " + " ".join(["castle"] * words)
    found = len(clip.tokenize(text)["l"])
    assert found == chunks, f"prompt_of_chunks: {found} chunks, wanted {chunks}"
    return text


def concept_model(width, height):
    """(MODEL, CLIP, positive, negative, latent): the tiny model with a seeded ED-LoRA of <c1> <c2>."""
    model, clip = models.tiny_model(), models.tiny_clip()
    edlora = random_edlora(["<c1>", "<c2>"], *model_lora_shapes(model, clip), seed=3, embedding_scale=0.5)
    model, clip = apply_edlora(model, clip, edlora, 0.7, 0.6)
    latent = {"samples": torch.zeros(1, 4, height // 8, width // 8)}
    return model, clip, encode(clip, GLOBAL_PROMPT), encode(clip, GLOBAL_NEGATIVE), latent


def tile_boxes(count, columns=8):
    """Normalized boxes tiling the image in rows of up to `columns` (whole cells of an 8x8 latent)."""
    columns = min(count, columns)
    rows = -(-count // columns)
    return [(i % columns / columns, i // columns / rows, (i % columns + 1) / columns, (i // columns + 1) / rows)
            for i in range(count)]


def concept_regions(clip, prompt_chunks):
    """Tiled regions, one per entry of prompt_chunks, each with a concept prompt of that many chunks."""
    regions = ()
    for box, chunks in zip(tile_boxes(len(prompt_chunks)), prompt_chunks):
        regions = RegionPrompt().add_region(clip, prompt_of_chunks(clip, chunks), REGION_NEGATIVE,
                                            ", ".join(map(str, box)), "normalized", 64, 64, 1.0, regions=regions)[0]
    return regions


def sampling_peak(setup, regions):
    model, _, positive, negative, latent = setup
    with PeakMemory() as peak:
        regional_run(model, positive, negative, regions, latent)(1)
    return peak.growth_mib


def encode_peak(clip, text):
    with PeakMemory() as peak:
        encode_layerwise(clip, text)
    return peak.growth_mib


def memory_tables():
    setup = concept_model(64, 64)
    clip = setup[1]
    regional_run(setup[0], *setup[2:4], concept_regions(clip, (1,)), setup[4])(1)  # warm-up
    print("| regions (prompt chunks) | peak growth of one sampling step (MiB) |")
    print("|---|---|")
    for chunks in PROMPT_CHUNKS:
        lengths = (OTHER_REGION_CHUNKS, chunks)
        print(f"| 2 ({', '.join(map(str, lengths))}) | {sampling_peak(setup, concept_regions(clip, lengths)):.1f} |")
    for count in MEMORY_REGION_COUNTS:
        print(f"| {count} (1 each) | {sampling_peak(setup, concept_regions(clip, (1,) * count)):.1f} |")
    print("\n| concept prompt chunks | peak growth of one EDLoRA Text Encode (MiB) |")
    print("|---|---|")
    for chunks in PROMPT_CHUNKS:
        print(f"| {chunks} | {encode_peak(clip, prompt_of_chunks(clip, chunks)):.1f} |")


def rerun_with_fixed_mmap_threshold():
    """Re-executes the script with FIXED_MMAP_THRESHOLD unless it is set (CPU only)."""
    if torch.cuda.is_available() or all(os.environ.get(k) == v for k, v in FIXED_MMAP_THRESHOLD.items()):
        return
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **FIXED_MMAP_THRESHOLD})


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="peak memory tables instead of timing (tiny model)")
    parser.add_argument("--quick", action="store_true",
                        help="the 32-channel TINY_UNET at 128x64 pixels, 2 steps, 1 repeat (a smoke run)")
    parser.add_argument("--model", choices=["CHECKPOINT_UNET", "TINY_UNET"], default=None,
                        help="harness.models UNet config (default CHECKPOINT_UNET, quick TINY_UNET)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default 4, quick 2)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default 256, quick 128)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default 128, quick 64)")
    args = parser.parse_args()
    defaults = (dict(model="TINY_UNET", repeats=1, steps=2, width=128, height=64) if args.quick
                else dict(model="CHECKPOINT_UNET", repeats=3, steps=4, width=256, height=128))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_runs(args):
    """{row name: run(steps)} on one seeded model, with every text encoded beforehand."""
    model = models.unet_model(getattr(models, args.model), seed=0)
    clip = models.tiny_clip()
    positive, negative = encode(clip, GLOBAL_PROMPT), encode(clip, GLOBAL_NEGATIVE)
    latent = {"samples": torch.zeros(1, 4, args.height // 8, args.width // 8)}
    runs = {"plain": sampler_run(model, positive, negative, latent)}
    for count in REGION_COUNTS:
        boxes = strip_boxes(count)
        regions = region_list(clip, boxes, args.width, args.height)
        runs[f"regional {count}"] = regional_run(model, positive, negative, regions, latent)
        runs[f"SetMask {count}"] = set_mask_run(model, positive, negative, clip, boxes, latent, args.width,
                                                args.height)
    return runs


def print_table(seconds, ratio_column):
    plain = seconds["plain"][ratio_column]
    rows = [("plain (KSampler)", "plain")]
    for count in REGION_COUNTS:
        plural = "s" * (count > 1)
        rows += [(f"regional, {count} region{plural} (Apply Regions + KSampler)", f"regional {count}"),
                 (f"ConditioningSetMask + Combine, {count} region{plural}", f"SetMask {count}")]
    print("| sampling | wall s | CPU s | ratio to plain | regional / SetMask |")
    print("|---|---|---|---|---|")
    for label, name in rows:
        wall, cpu = seconds[name]
        versus = ""
        if name.startswith("regional"):
            versus = f"{seconds[name][ratio_column] / seconds[name.replace('regional', 'SetMask')][ratio_column]:.2f}"
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {seconds[name][ratio_column] / plain:.2f} | {versus} |")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    logging.getLogger().setLevel(logging.WARNING)
    if args.memory:
        rerun_with_fixed_mmap_threshold()
        with torch.inference_mode():
            memory_tables()
        return
    with torch.inference_mode():
        seconds = interleaved_medians(build_runs(args), args.steps, args.repeats)
    config = getattr(models, args.model)
    device = comfy.model_management.get_torch_device()
    ratio_column = 1 if device.type == "cpu" else 0
    print(f"model: harness.models.{args.model} (seeded random SD1.5-topology UNet, model_channels "
          f"{config['model_channels']}, channel_mult {config['channel_mult']}, 16 cross-attention layers), "
          f"{models.TINY_CLIP['num_hidden_layers']}-layer CLIP")
    print(f"device: {device}, torch threads: {torch.get_num_threads()}; {args.width}x{args.height} pixels, batch 1, "
          f"{args.steps} steps {SAMPLER['sampler_name']}, cfg {SAMPLER['cfg']}; median of {args.repeats}; "
          f"ratios from {'CPU' if ratio_column else 'wall'} time")
    print_table(seconds, ratio_column)


if __name__ == "__main__":
    main()
