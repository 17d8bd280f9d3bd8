"""Fusing an ordinary LoRA with an ED-LoRA: identity of gradient fusion vs weight averaging vs stacking.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lora_fusion.py [--steps 2 6]

On the harness's tiny SD1.5-topology model (CPU, one torch thread): a seeded ED-LoRA (<a1> <a2>,
LoRA on the attention linears) and a seeded kohya LoRA (trigger 'zorbo', LoRA on every transformer
linear/projection and text-encoder linear) are combined three ways: Gradient Fuse (gradient),
Gradient Fuse (weight_average: ΣΔW/N), and stacking (EDLoRA Loader then the stock LoraLoader, the
usual ComfyUI chain). Identity error per concept = ‖ε_fused − ε_own‖ / ‖ε_own − ε_base‖ of the noise
predictions, summed over the latents of the concept's own capture-style sampling run (seed + index,
64 px, dpmpp_2m, the capture step count), on its prompt (cond) and on the empty prompt (uncond).
0 = the concept's own model, 1 = as far from it as the base model is.
"""
import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _bootstrap  # noqa: E402

_bootstrap.add_host(cpu=True)

import torch  # noqa: E402

from comfyui_mixofshow.harness import models  # noqa: E402
from comfyui_mixofshow.harness.fusion_checks import CAPTURE  # noqa: E402
from comfyui_mixofshow.harness.lora_fixtures import mixed_identity  # noqa: E402


def print_table(rows):
    print("\n### Identity of a mixed ED-LoRA + ordinary LoRA fusion (lower is better)\n")
    print("| capture steps | method | ED-LoRA cond | ED-LoRA uncond | LoRA cond | LoRA uncond | mean |")
    print("|---|---|---|---|---|---|---|")
    for steps, table in rows.items():
        for method, concepts in table.items():
            values = [errors[part] for errors in concepts.values() for part in ("cond", "uncond")]
            print(f"| {steps} | {method} | " + " | ".join(f"{v:.3f}" for v in values)
                  + f" | {sum(values) / len(values):.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[CAPTURE["capture_steps"], 6],
                        help="capture step counts to measure (default: the tests' 2, and 6)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with torch.inference_mode():
        model, clip = models.tiny_model(), models.tiny_clip()
        print(f"tiny SD1.5-topology model, CPU, torch threads {torch.get_num_threads()}, capture "
              f"{CAPTURE['capture_resolution']} px / seed {CAPTURE['seed']}")
        print_table({steps: mixed_identity(model, clip, dict(CAPTURE, capture_steps=steps)) for steps in args.steps})
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
