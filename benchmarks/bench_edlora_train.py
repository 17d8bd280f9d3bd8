"""Seconds per ED-LoRA training step and peak memory: tiny and full-size SD1.5 shapes, with and
without gradient checkpointing, all measured in this one run.

    .venv/bin/python benchmarks/bench_edlora_train.py [--steps 3] [--resolution 128] [--quick]

Each configuration trains through EDLoRA Train's own host path (private fp32 copies of a
seeded random UNet and CLIP, LoRA hooks, 16 per-layer text encodings per image, attention
regulariser on) on generated images, batch 1. The full-size model has SD1.5's UNet
(320/640/1280 channels, 16 transformer blocks) and 12-layer CLIP-L; the VAE is TAESD in both
(it only encodes the batch). Peak memory is what the training steps add on top of the loaded
models, warm-up step included: on CUDA torch's peak allocation, on the CPU the peak resident
set (reset before the steps via /proc/self/clear_refs). Times are medians of wall-clock and of
process CPU time (all threads); on a shared machine the CPU time is the steadier figure.
--quick: tiny model only, one timed step.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import _bootstrap

_bootstrap.add_host(cpu=not torch.cuda.is_available())

import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from comfyui_mixofshow.harness import models  # noqa: E402
from comfyui_mixofshow.mixofshow_core.training.dataset import load_dataset  # noqa: E402
from comfyui_mixofshow.mixofshow_core.training.loop import TrainingConfig  # noqa: E402
from comfyui_mixofshow.nodes.edlora_train import host_training, initial_tables  # noqa: E402

WORDS = ("<b1>", "<b2>")


def full_model(seed=0):
    """SD1.5's UNet shapes, stored in fp16 like a loaded checkpoint (training copies it to fp32)."""
    config = comfy.supported_models.SD15(dict(models.TINY_UNET, model_channels=320))
    config.set_inference_dtype(torch.float16, None)
    unet = comfy.model_base.BaseModel(config, device="cpu")
    unet.load_state_dict(models.seeded_state(unet.state_dict(), seed), strict=True)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(unet, load_device=device, offload_device=torch.device("cpu"))


def full_clip(seed=1):
    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params = {}
    clip = comfy.sd.CLIP(Target)
    clip.cond_stage_model.load_state_dict(models.seeded_state(clip.cond_stage_model.state_dict(), seed), strict=False)
    return clip


def write_images(folder, resolution):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(((resolution, resolution * 3 // 2), (resolution * 3 // 2, resolution))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(Path(folder) / f"{i}.png")
        (Path(folder) / f"{i}.txt").write_text("<TOK>, red shirt, smiling, outdoors")
    return folder


def memory_now():
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return _proc_status("VmRSS")


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory():
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _proc_status("VmHWM")


def _proc_status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(model, clip, vae, samples, resolution, checkpointing, steps, precision="no", granularity=None):
    config = TrainingConfig(total_steps=steps + 1, words=WORDS, batch_size=1, resolution=resolution, seed=0,
                            mixed_precision=precision)
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(clip, WORDS, ("<rand-0.013>", "man"), 0, granularity)
        with host_training(model, clip, vae, samples, config, tables, 4, checkpointing, granularity) as training:
            base, peak_known = memory_now(), reset_peak()
            training.train_step()  # warm-up, inside the peak: later steps reuse its allocations
            wall, cpu = [], []
            for _ in range(steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                training.train_step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            added = (peak_memory() - base) / 2 ** 20 if peak_known else float("nan")
            return statistics.median(wall), statistics.median(cpu), added, peak_memory() / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--resolution", type=int, default=128, help="full-size model resolution in pixels")
    parser.add_argument("--quick", action="store_true", help="tiny model only, one timed step")
    args = parser.parse_args()
    steps = 1 if args.quick else args.steps
    device = comfy.model_management.get_torch_device()
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch 1, {steps} timed steps after a warm-up")
    sizes = [("tiny (32-ch UNet, 2-layer CLIP)", models.tiny_model, models.tiny_clip, 64)]
    if not args.quick:
        sizes.append(("SD1.5 (860M UNet, 12-layer CLIP)", full_model, full_clip, args.resolution))
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        vae = models.tiny_vae()
        for label, make_model, make_clip, resolution in sizes:
            model, clip = make_model(), make_clip()
            samples = load_dataset(write_images(folder, resolution), "<TOK>", resolution)
            for checkpointing in (False, True):
                wall, cpu, added, peak = measure(model, clip, vae, samples, resolution, checkpointing, steps)
                rows.append((label, resolution, "on" if checkpointing else "off", wall, cpu, added, peak))
                print(f"  measured {label} {resolution}px checkpointing={checkpointing}: {wall:.2f} s/step", flush=True)
            del model, clip
    header = ("model", "px", "grad ckpt", "s/step (wall)", "CPU s/step", "step peak MiB", "process peak MiB")
    print()
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for label, resolution, checkpointing, wall, cpu, added, peak in rows:
        print(f"{label} | {resolution} | {checkpointing} | {wall:.2f} | {cpu:.2f} | {added:.0f} | {peak:.0f}")


if __name__ == "__main__":
    main()
