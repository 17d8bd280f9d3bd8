"""Cost of one layer-wise encode relative to one plain CLIPTextEncode, full-size SD1.5 CLIP.

    .venv/bin/python benchmarks/bench_layerwise_encode.py [--repeats 7]

Both are measured in the same run on the same seeded random full-size CLIP-L (123M
parameters) with an ED-LoRA's text-encoder LoRA applied; the table prints median seconds and
the ratio. Target: a layer-wise encode costs at most 3x a plain one.
"""
import argparse
import statistics
import time

import torch

import _bootstrap

_bootstrap.add_host(cpu=not torch.cuda.is_available())

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import nodes as comfy_nodes  # noqa: E402

from comfyui_mixofshow.harness.edlora_fixtures import random_edlora  # noqa: E402
from comfyui_mixofshow.harness.models import seeded_state  # noqa: E402
from comfyui_mixofshow.nodes.edlora_loader import lora_patches  # noqa: E402
from comfyui_mixofshow.nodes.concepts import concepts_of, set_concepts  # noqa: E402
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise  # noqa: E402
from comfyui_mixofshow.nodes.model_keys import clip_weight_keys, weight_shapes  # noqa: E402


def full_clip():
    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params = {}
    clip = comfy.sd.CLIP(Target)
    clip.cond_stage_model.load_state_dict(seeded_state(clip.cond_stage_model.state_dict(), 0), strict=False)
    return clip


def with_concept(clip):
    text_shapes = {p: weight_shapes(clip.patcher)[k] for p, k in clip_weight_keys(clip).items()}
    edlora = random_edlora(["<a1>", "<a2>"], {}, text_shapes, seed=1, embedding_scale=0.3)
    patched = clip.clone()
    patched.add_patches(lora_patches(edlora.text_encoder, clip_weight_keys(clip), weight_shapes(clip.patcher),
                                     edlora.name, "text_encoder"), 0.7)
    set_concepts(patched, concepts_of(patched).with_embeddings(edlora.embeddings, edlora.name))
    return patched


def median_seconds(fn, repeats):
    fn()  # warm-up: loads and patches the model
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    clip = with_concept(full_clip())
    prompt = "a photo of <a1> <a2> walking in a park, detailed, sunny"
    plain_prompt = "a photo of a man walking in a park, detailed, sunny"
    stock = comfy_nodes.CLIPTextEncode()
    with torch.inference_mode():
        plain = median_seconds(lambda: stock.encode(clip, plain_prompt), args.repeats)
        layerwise = median_seconds(lambda: encode_layerwise(clip, prompt), args.repeats)
        no_concept = median_seconds(lambda: encode_layerwise(clip, plain_prompt), args.repeats)
    device = comfy.model_management.text_encoder_device()
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)")
    print("| encode | seconds | ratio to CLIPTextEncode |")
    print("|---|---|---|")
    print(f"| CLIPTextEncode (plain prompt) | {plain:.4f} | 1.00 |")
    print(f"| EDLoRA Text Encode, 2 concept words (16 layer copies) | {layerwise:.4f} | {layerwise / plain:.2f} |")
    print(f"| EDLoRA Text Encode, no concept words | {no_concept:.4f} | {no_concept / plain:.2f} |")


if __name__ == "__main__":
    main()
