"""Cost of SDXL layer-wise text encoding at the two granularities (families.py), for the decision.

    .venv/bin/python benchmarks/bench_sdxl_encode.py [--repeats 3]

A concept word binds one embedding row per unit: per transformer block (70 copies of the prompt
to encode) or per spatial transformer (11 copies). Measured here:
1. one real-width SDXL text layer (clip_l 768 / 12 heads / MLP 3072, clip_g 1280 / 20 heads /
   MLP 5120, 77 tokens, causal mask) at a batch of 11 and of 70 prompt copies: forward seconds
   (the host's CLIPLayer), forward+backward seconds and the activation bytes autograd saves
   (torch's pre-LN TransformerEncoderLayer, the same computation without the host's in-place adds;
   training: the embeddings and the text LoRAs get gradients through every copy); scaled by the
   layer counts of the full encoders (clip_l 12, clip_g 32, penultimate outputs: 11 and 31 layers
   run) to the whole SDXL text stack.
2. the plugin's EDLoRA Text Encode end to end on the tiny SDXL CLIP (full widths, 3 layers):
   seconds for a plain prompt, and for a 2-word concept prompt at each granularity.
Printed as tables; nothing is asserted.
"""
import argparse
import statistics
import time

import torch

import _bootstrap

_bootstrap.add_host(cpu=True)

import comfy.clip_model  # noqa: E402
import comfy.ldm.modules.attention  # noqa: E402
import nodes as comfy_nodes  # noqa: E402

from comfyui_mixofshow.harness import sdxl_models  # noqa: E402
from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora  # noqa: E402
from comfyui_mixofshow.harness.models import seeded_state  # noqa: E402
from comfyui_mixofshow.mixofshow_core.families import SDXL  # noqa: E402
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora  # noqa: E402
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise  # noqa: E402

# (name, width, heads, MLP width, activation, layers run for the penultimate output)
ENCODERS = (("clip_l", 768, 12, 3072, "quick_gelu", 11), ("clip_g", 1280, 20, 5120, "gelu", 31))
COPIES = {"transformer": SDXL.num_rows("transformer"), "block": SDXL.num_rows("block")}


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def text_layer(width, heads, mlp, activation):
    layer = comfy.clip_model.CLIPLayer(width, heads, mlp, activation, torch.float32, "cpu", torch.nn)
    layer.load_state_dict(seeded_state(layer.state_dict(), 0))
    return layer


def saved_bytes(fn, module):
    """Bytes of the activations autograd keeps for the backward pass while fn() runs (the
    module's own weights, which it also keeps, are not counted: they do not grow with copies)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def layer_costs(width, heads, mlp, activation, copies, repeats):
    """(forward s, forward+backward s, saved bytes) of one layer on `copies` 77-token prompts."""
    layer = text_layer(width, heads, mlp, activation)
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    attention = comfy.ldm.modules.attention.optimized_attention_for_device(torch.device("cpu"), mask=True,
                                                                            small_input=True)
    x = torch.randn(copies, 77, width)

    def forward():
        with torch.no_grad():
            layer(x, mask, attention)

    # the host's layer adds in place (inference only); training runs torch's pre-LN encoder layer
    trained = torch.nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=True)

    def trained_forward():
        return trained(x.clone().requires_grad_(), src_mask=mask, is_causal=True)

    def train_step():
        trained_forward().square().mean().backward()
    saved = saved_bytes(trained_forward, trained)
    return median_seconds(forward, repeats), median_seconds(train_step, repeats), saved


def text_stack_table(repeats):
    print("SDXL text stack per step, from one measured layer of each encoder × layers run (11 clip_l + 31 clip_g)")
    print("| granularity | prompt copies | encode s | train fwd+bwd s | saved activations fp32 GiB | fp16 GiB |")
    print("|---|---|---|---|---|---|")
    for granularity, copies in COPIES.items():
        encode = train = saved = 0.0
        for _, width, heads, mlp, activation, layers in ENCODERS:
            f, fb, s = layer_costs(width, heads, mlp, activation, copies, repeats)
            encode, train, saved = encode + layers * f, train + layers * fb, saved + layers * s
        print(f"| {granularity} | {copies} | {encode:.2f} | {train:.2f} | {saved / 2 ** 30:.2f} | {saved / 2 ** 31:.2f} |")


def encode_table(repeats):
    model, clip = sdxl_models.tiny_sdxl_model(), sdxl_models.tiny_sdxl_clip()
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    text_shapes_2 = model_lora_shapes(model, clip, "text_encoder_2")[1]
    prompt, plain = "a photo of <a1> <a2> in a park, detailed", "a photo of a man in a park, detailed"
    stock = median_seconds(lambda: comfy_nodes.CLIPTextEncode().encode(clip, plain), repeats)
    print("EDLoRA Text Encode on the tiny SDXL CLIP (768 + 1280 wide, 3 layers each), median seconds")
    print("| encode | seconds | ratio to CLIPTextEncode | conditioning stack MiB |")
    print("|---|---|---|---|")
    print(f"| CLIPTextEncode, plain prompt | {stock:.3f} | 1.00 | - |")
    for granularity in COPIES:
        edlora = random_edlora(["<a1>", "<a2>"], unet_shapes, text_shapes, seed=1, family=SDXL,
                               granularity=granularity, text_shapes_2=text_shapes_2)
        _, patched = apply_edlora(model, clip, edlora, 0.7, 0.7)
        seconds = median_seconds(lambda: encode_layerwise(patched, prompt), repeats)
        stack = encode_layerwise(patched, prompt)[0][1]["model_conds"]["edlora_ctx"].cond
        mib = stack.numel() * stack.element_size() / 2 ** 20
        print(f"| EDLoRA Text Encode, {granularity} ({COPIES[granularity]} copies) | {seconds:.3f} | "
              f"{seconds / stock:.2f} | {mib:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median), CPU, float32")
    with torch.inference_mode():
        encode_table(args.repeats)
    text_stack_table(args.repeats)


if __name__ == "__main__":
    main()
