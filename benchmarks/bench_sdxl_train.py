"""Seconds per ED-LoRA training step and peak memory at SDXL shapes, and how they scale to the full
model at 1024 px.

    .venv/bin/python benchmarks/bench_sdxl_train.py [--steps 2] [--quick]

Every row trains through EDLoRA Train's own host path (private copies, LoRA on all 70 blocks and
both encoders' attention, per-layer clip_l ‖ clip_g encodings, ADM size conditioning, attention
regulariser on), batch 1, on generated images. The full SDXL (2.6 G UNet parameters, 12-layer
CLIP-L and 32-layer OpenCLIP bigG) does not fit this shared CPU machine, so the rows measure the
real SDXL topology (70 transformer blocks in 11 spatial transformers, 2048-wide context) at
reduced UNet widths and with full-width, real-MLP but shallow text encoders, and the printout
counts what the full model has: parameters, and per-step text-encoder work (it is exactly linear
in layers and in encoded copies: one per embedding row, 70 at "block" granularity, 11 at
"transformer"). Peak memory as in bench_edlora_train.py (CUDA peak allocation or the CPU's
resident-set high-water mark over the steps, warm-up included).
--quick: the tiny model only, one timed step.
"""
import argparse
import json
import tempfile

import torch

import _bootstrap

_bootstrap.add_host(cpu=not torch.cuda.is_available())

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402

from bench_edlora_train import measure, write_images  # noqa: E402
from comfyui_mixofshow.harness import models, sdxl_models  # noqa: E402
from comfyui_mixofshow.mixofshow_core.families import SDXL  # noqa: E402
from comfyui_mixofshow.mixofshow_core.training.dataset import load_dataset  # noqa: E402

FULL_CLIP_L = dict(models.TINY_CLIP, intermediate_size=3072, num_hidden_layers=12)
FULL_CLIP_G = dict(sdxl_models.TINY_CLIP_G, intermediate_size=5120, num_hidden_layers=32)


def shallow_clip(layers, seed=1):
    """CLIP with SDXL's encoder widths and MLPs (clip_l 768/3072, clip_g 1280/5120) and `layers` layers each."""
    folder = tempfile.mkdtemp(prefix="mixofshow-bench-clip-")
    paths = []
    for name, config in (("clip_l", FULL_CLIP_L), ("clip_g", FULL_CLIP_G)):
        paths.append(sdxl_models._write_json(folder, f"{name}.json", dict(config, num_hidden_layers=layers)))

    class Target:
        clip = sdxl_models._tiny_sdxl_clip_class(*paths)
        tokenizer = comfy.sdxl_clip.SDXLTokenizer
        params = {}
    clip = comfy.sd.CLIP(Target)
    clip.cond_stage_model.load_state_dict(models.seeded_state(clip.cond_stage_model.state_dict(), seed), strict=True)
    return clip


def unet_config(channels):
    return dict(sdxl_models.TINY_SDXL_UNET, model_channels=channels)


def parameter_count(config):
    import comfy.model_base
    model_config = comfy.supported_models.SDXL(dict(config))
    with torch.device("meta"):
        unet = comfy.model_base.SDXL(model_config, device="meta").diffusion_model
    return sum(p.numel() for p in unet.parameters())


def text_layer_parameters(config):
    width, hidden = config["hidden_size"], config["intermediate_size"]
    return 4 * width * width + 2 * width * hidden


def print_scaling(rows):
    full_unet = parameter_count(dict(sdxl_models.TINY_SDXL_UNET, model_channels=320, channel_mult=[1, 2, 4]))
    print(f"\nfull SDXL UNet: {full_unet / 1e9:.2f} G parameters "
          f"({full_unet * 2 / 2 ** 30:.1f} GiB in fp16/bf16, {full_unet * 4 / 2 ** 30:.1f} GiB in fp32); "
          f"measured widths: " + ", ".join(f"{c}-ch {parameter_count(unet_config(c)) / 1e6:.0f} M"
                                           for c in sorted({r['channels'] for r in rows})))
    per_token = {name: text_layer_parameters(c) * c["num_hidden_layers"] for name, c in
                 (("clip_l", FULL_CLIP_L), ("clip_g", FULL_CLIP_G))}
    total = sum(per_token.values())
    print(f"full text encoders: clip_l {per_token['clip_l'] / 1e6:.0f} M + clip_g {per_token['clip_g'] / 1e6:.0f} M "
          f"layer parameters; one encoded copy (77 tokens) is {2 * 77 * total / 1e12:.3f} TFLOP forward, "
          f"about 3x that with backward")
    for granularity in ("block", "transformer"):
        copies = SDXL.num_rows(granularity)
        print(f"  {granularity:<11} granularity: {copies} copies per caption -> "
              f"{6 * 77 * total * copies / 1e12:.1f} TFLOP text work per image per step")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="tiny model only, one timed step")
    args = parser.parse_args()
    steps = 1 if args.quick else args.steps
    device = comfy.model_management.get_torch_device()
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch 1, {steps} timed steps after a warm-up")
    # (UNet channels, encoder layers: None = the tiny 3-layer encoders, resolution, granularity, checkpointing)
    plan = [(32, None, 64, g, False) for g in ("block", "transformer")]
    if not args.quick:
        plan += [(64, 3, 128, "transformer", ckpt) for ckpt in (False, True)]
        plan += [(64, 3, 256, "transformer", True), (64, 6, 128, "transformer", True)]
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        vae = models.tiny_vae()
        for channels, layers, resolution, granularity, checkpointing in plan:
            model = sdxl_models.sdxl_model(unet_config(channels))
            clip = sdxl_models.tiny_sdxl_clip() if layers is None else shallow_clip(layers)
            samples = load_dataset(write_images(folder, resolution), "<TOK>", resolution)
            wall, cpu, added, peak = measure(model, clip, vae, samples, resolution, checkpointing, steps,
                                             granularity=granularity)
            rows.append(dict(channels=channels, layers=layers or 3, px=resolution, granularity=granularity,
                             ckpt="on" if checkpointing else "off", wall=wall, cpu=cpu, added=added, peak=peak))
            print(f"  measured {json.dumps(rows[-1])}", flush=True)
            del model, clip
    header = ("UNet ch", "enc layers", "px", "granularity", "grad ckpt", "s/step (wall)", "CPU s/step",
              "step peak MiB", "process peak MiB")
    print()
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(f"{r['channels']} | {r['layers']} | {r['px']} | {r['granularity']} | {r['ckpt']} | {r['wall']:.2f} | "
              f"{r['cpu']:.2f} | {r['added']:.0f} | {r['peak']:.0f}")
    print_scaling(rows)


if __name__ == "__main__":
    main()
