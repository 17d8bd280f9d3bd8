"""Seeded ordinary LoRA files in every key style LoraLoader reads for SD1.5, shaped for a given
model, with each layer's ΔW computed independently in plain torch from the file's tensors; and the
identity measure of fusions (each concept's noise prediction in the fused model vs its own model).
Needs ComfyUI on sys.path."""
import comfy.sample
import comfy.samplers
import comfy.sd
import re

import torch

from ..nodes.edlora_text_encode import encode_layerwise
from ..nodes.model_keys import clip_weight_keys, unet_weight_keys, weight_shapes

STYLES = ("kohya", "diffusers", "peft", "locon", "loha", "lokr")
KOHYA = {"unet": "lora_unet_", "text": "lora_te_"}
TEXT_PREFIX = "clip_l.transformer."


def kohya_name(part, path):
    return KOHYA[part] + path.replace(".", "_")


def diffusers_name(part, path):
    """diffusers' own LoRA names (attention processors; to_out.0 -> to_out)."""
    if part == "text":
        return "text_encoder." + path
    path = path.replace(".to_", ".processor.to_")
    return "unet." + (path[:-2] if path.endswith(".to_out.0") else path)


def lora_layers(model, clip, style, attention_only=False):
    """[(part, module path, weight shape, model key)]: the transformer blocks' attention, ff and
    projection layers and the text encoder's linears (diffusers/peft: attention only, as diffusers
    trains them); LoCon adds the 3x3 convolutions of the first down block's resnets."""
    unet_keys, text_keys = unet_weight_keys(model), clip_weight_keys(clip)
    unet_shapes, text_shapes = weight_shapes(model), weight_shapes(clip.patcher)
    attention_only = attention_only or style in ("diffusers", "peft")
    layers = []
    for path, key in sorted(unet_keys.items()):
        shape = unet_shapes.get(key)
        if shape is None or len(shape) not in (2, 4) or ".attentions." not in path:
            continue
        if len(shape) == 4 and shape[2:] != (1, 1) or attention_only and ".attn" not in path:
            continue
        layers.append(("unet", path, shape, key))
    if style == "locon":
        layers += [("unet", p, unet_shapes[k], k) for p, k in sorted(unet_keys.items())
                   if p.startswith("down_blocks.0.resnets.") and p.endswith((".conv1", ".conv2"))]
    layers += [("text", p, text_shapes[k], k) for p, k in sorted(text_keys.items())
               if k in text_shapes and (not attention_only or ".self_attn." in p)]
    return layers


def random_lora(model, clip, style, seed=0, rank=4, scale=0.5, text_scale=0.05, attention_only=False):
    """(state dict of a LoRA file in `style`, {model key: ΔW at strength 1} from plain torch)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    state, expected = {}, {}
    for part, path, shape, key in lora_layers(model, clip, style, attention_only):
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        size = scale if part == "unet" else text_scale
        alpha = rank / 2.0
        if style in ("loha", "lokr"):
            name = kohya_name(part, path)
            delta = _lycoris(state, name, style, out_dim, in_dim, rank, alpha, size, randn)
            expected[key] = delta.reshape(shape)
            continue
        fan_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
        down = randn(rank, in_dim, *kernel) / fan_in ** 0.5
        up = randn(out_dim, rank, *((1, 1) if kernel else ())) * size / rank ** 0.5
        if style in ("kohya", "locon"):
            name = kohya_name(part, path)
            state.update({name + ".lora_down.weight": down, name + ".lora_up.weight": up,
                          name + ".alpha": torch.tensor(alpha)})
            factor = alpha / rank
        elif style == "diffusers":
            name = diffusers_name(part, path)
            state.update({name + "_lora.down.weight": down, name + "_lora.up.weight": up})
            factor = 1.0
        else:
            name = diffusers_name(part, path)  # PEFT's lora_A/lora_B on diffusers' names
            state.update({name + ".lora_A.weight": down, name + ".lora_B.weight": up})
            factor = 1.0
        expected[key] = (factor * (up.flatten(1) @ down.flatten(1))).reshape(shape)
    return state, expected


def _lycoris(state, name, style, out_dim, in_dim, rank, alpha, size, randn):
    """LoHa: ΔW = α/r (w1a w1b) ⊙ (w2a w2b). LoKr: ΔW = α/r kron(w1, w2a w2b), w1 [4, 4]."""
    state[name + ".alpha"] = torch.tensor(alpha)
    if style == "loha":
        parts = {"hada_w1_a": randn(out_dim, rank), "hada_w1_b": randn(rank, in_dim) / in_dim ** 0.5,
                 "hada_w2_a": randn(out_dim, rank) * size ** 0.5, "hada_w2_b": randn(rank, in_dim) / in_dim ** 0.5}
        state.update({f"{name}.{k}": v for k, v in parts.items()})
        return alpha / rank * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    w1 = randn(4, 4)
    w2_a, w2_b = randn(out_dim // 4, rank) * size / rank ** 0.5, randn(rank, in_dim // 4) / in_dim ** 0.5
    state.update({name + ".lokr_w1": w1, name + ".lokr_w2_a": w2_a, name + ".lokr_w2_b": w2_b})
    return alpha / rank * torch.kron(w1, w2_a @ w2_b)


def stock_lora(model, clip, state, strength_model=1.0, strength_clip=1.0):
    """(MODEL, CLIP) with the LoRA applied by the host's LoraLoader path."""
    return comfy.sd.load_lora_for_models(model, clip, state, strength_model, strength_clip)


def noise_prediction(model, clip, text, x, sigma):
    """ε the model predicts for the prompt `text` (layer-wise encoded) at latent x and noise level
    sigma, through the host's sampling path with CFG 1 (one prediction, no uncond mixing)."""
    cond = encode_layerwise(clip, text)
    recorded = {}

    def record(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        recorded["denoised"] = model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return recorded["denoised"]

    # the sampler starts from latent + σ·noise: a zero latent and noise x/σ give exactly x
    comfy.sample.sample_custom(model, x / sigma, 1.0, comfy.samplers.KSAMPLER(record), torch.tensor([sigma, 0.0]),
                               cond, cond, torch.zeros_like(x), seed=0, disable_pbar=True)
    return (x - recorded["denoised"]) / sigma


def normal_sigmas(sampling, steps):
    """The 'normal' scheduler's σ: timesteps evenly spaced from σ_max to σ_min (both hosts)."""
    timesteps = torch.linspace(float(sampling.timestep(sampling.sigma_max)), float(sampling.timestep(sampling.sigma_min)),
                               steps)
    return torch.cat([torch.stack([sampling.sigma(t) for t in timesteps]).flatten(), torch.zeros(1)])


def capture_states(model, clip, text, seed, size, steps):
    """[(x, σ)] the sampler visits in the capture-style run of `text` (dpmpp_2m, normal, CFG 1)."""
    states = []

    def callback(step, x0, x, total):
        states.append(x.clone())

    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, size, size), seed)
    sigmas = normal_sigmas(model.model.model_sampling, steps)
    cond = encode_layerwise(clip, text)
    comfy.sample.sample(model, noise, steps, 1.0, "dpmpp_2m", "normal", cond, cond, torch.zeros_like(noise),
                        seed=seed, callback=callback, disable_pbar=True)
    return list(zip(states, sigmas[:len(states)].tolist()))


CONCEPT_WORD = re.compile(r"<[^<>\s]+>")


def identity_error(candidate, own, base, prompt, states):
    """{'cond', 'uncond'}: ‖ε_candidate − ε_own‖ / ‖ε_own − ε_base‖ summed over `states` [(x, σ)],
    on the concept's prompt and on the empty prompt. Each of candidate/own/base is (MODEL, CLIP);
    the base model reads the prompt without its <concept> words."""
    errors = {}
    for name, text in (("cond", prompt), ("uncond", "")):
        base_text = " ".join(CONCEPT_WORD.sub("", text).split())
        num = den = 0.0
        for x, sigma in states:
            own_eps = noise_prediction(*own, text, x, sigma)
            num += float((noise_prediction(*candidate, text, x, sigma) - own_eps).norm() ** 2)
            den += float((own_eps - noise_prediction(*base, base_text, x, sigma)).norm() ** 2)
        errors[name] = (num / den) ** 0.5
    return errors


def mixed_case(model, clip):
    """A seeded ED-LoRA (<a1> <a2>) and a seeded kohya LoRA (trigger 'zorbo'), each with its own
    model: [(concept, own (MODEL, CLIP), prompt)] and the LoRA's file tensors."""
    from ..nodes.edlora_loader import apply_edlora
    from ..nodes.lora_concept import LoRAConcept
    from .fusion_checks import seeded_concepts
    edlora = seeded_concepts(model, clip, 1)[0]
    state, _ = random_lora(model, clip, "kohya", seed=11)
    lora = LoRAConcept("zorbo.safetensors", state, ("zorbo",), "", {}, 1.0, 1.0)
    cases = [(edlora, apply_edlora(model, clip, edlora.edlora, 1.0, 1.0), "photo of a <a1> <a2>"),
             (lora, stock_lora(model, clip, state), "photo of a zorbo")]
    return cases, state


def mixed_identity(model, clip, capture):
    """{method: {concept name: {'cond', 'uncond'}}} for gradient fusion, weight averaging and
    stacking (the ED-LoRA loader followed by the stock LoraLoader) of the mixed case, measured on the
    latents of each concept's own capture-style run (seed + index): the inputs fusion fits."""
    from ..nodes.edlora_loader import apply_edlora
    from ..nodes.gradient_fuse import fuse
    cases, state = mixed_case(model, clip)
    concepts = [concept for concept, _, _ in cases]
    candidates = {"gradient": fuse(model, clip, concepts, "gradient", **capture)[:2],
                  "weight_average": fuse(model, clip, concepts, "weight_average", **capture)[:2],
                  "stacking": stock_lora(*apply_edlora(model, clip, concepts[0].edlora, 1.0, 1.0), state)}
    size, steps = capture["capture_resolution"] // 8, capture["capture_steps"]
    table = {method: {} for method in candidates}
    for index, (concept, own, prompt) in enumerate(cases):
        states = capture_states(*own, prompt, capture["seed"] + index, size, steps)
        for method, candidate in candidates.items():
            table[method][concept.name] = identity_error(candidate, own, (model, clip), prompt, states)
    return table


# the two ordinary LoRAs of workflows/fuse_two_loras*.json: (file name, trigger word, seed)
DEMO_LORAS = (("mixofshow_demo_lora_alice.safetensors", "alicea", 31),
              ("mixofshow_demo_lora_bob.safetensors", "bobbo", 32))


def write_demo_loras(checkpoint, folder):
    """Seeded kohya LoRAs (attention and text-encoder linears) for the demo checkpoint, with kohya
    training-tag metadata naming their trigger words, written into `folder` if missing."""
    import json
    from pathlib import Path
    from safetensors.torch import save_file
    paths = [Path(folder) / name for name, _, _ in DEMO_LORAS]
    if all(p.is_file() and p.stat().st_mtime >= Path(checkpoint).stat().st_mtime for p in paths):
        return paths
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=True)
        for path, (_, trigger, seed) in zip(paths, DEMO_LORAS):
            state, _ = random_lora(model, clip, "kohya", seed=seed, scale=0.2, attention_only=True)
            tags = {f"10_{trigger}": {trigger: 10, "1girl" if trigger == "alicea" else "1boy": 9, "smile": 4}}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name("." + path.name + ".partial")
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"ss_tag_frequency": json.dumps(tags)})
            tmp.replace(path)
    return paths
