"""EDLoRA Train: Mix-of-Show single-client ED-LoRA training (notes §1) on the host's MODEL,
CLIP and VAE, for every model family (mixofshow_core.families: SD1.5, SDXL).

Node functions run inside torch.inference_mode() and the host's weights are inference
tensors, which autograd may not keep for backward; current ComfyUI also loads weights
dynamically (cast per op, patches applied on the fly), so its loaded modules are not plain
modules to train through. Training therefore runs on private UNet and text-encoder modules
built from the host's own model config with plain ops, holding copies (made with inference
mode off) of the weights with every host patch applied; the user's MODEL and CLIP are never
touched. Concept words are not added to the vocabulary: their [rows, context width] tables
(clip_l ‖ clip_g columns on SDXL) are trained directly and spliced in by EDLoRA Text Encode's
sentinel mechanism (bound_token_copies), and cross-attention layer l reads encoding l through
the same attn2 patch as at inference. SDXL's ADM input (the pooled output of the last encoder
with the size conditioning of each training image) comes from the host model's own encode_adm.

An interrupt (the host's exception, raised from the progress hook or, in current ComfyUI, from
inside any op) saves a resumable state at the last completed step and is raised again.
"""
import glob
import hashlib
import json
import logging
import os
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.sample
import comfy.sd1_clip
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
from PIL import Image

from ..mixofshow_core.edlora_format import (BASE_FAMILY, CONCEPT_WORD, EDLoRA, LoRALayer, check_pth_replaceable,
                                            save_edlora, save_edlora_with_pth)
from ..mixofshow_core.families import GRANULARITIES
from ..mixofshow_core.training.attention import AttentionProbe
from ..mixofshow_core.training.dataset import load_dataset
from ..mixofshow_core.training.diffusion import NoiseSchedule
from ..mixofshow_core.training.embeddings import initial_table, parse_initializer
from ..mixofshow_core.training.hooks import checkpointed, cloned_inputs
from ..mixofshow_core.training.lora import attached, make_adapters
from ..mixofshow_core.training.loop import (EDLoRATraining, TrainingConfig, TrainingModel, derived_seed,
                                            run_training, steps_for_repeats)
from ..mixofshow_core.training.plot import loss_curve
from ..mixofshow_core.training.state import TrainingStateError, load_training_state, save_training_state
from ..mixofshow_core.training.transforms import CAPTION_TEMPLATES, bind_placeholder, longest_template
from . import compat
from .edlora_loader import apply_edlora
from .edlora_text_encode import bound_token_copies, encode_layerwise, single_token_id
from .layerwise import CONTEXT_KEY, SELECTORS
from .model_keys import require_family, unet_weight_keys
from .paths import (EDLORA_FOLDER, STATE_FOLDER, WrittenFiles, check_output_name, input_folder, inside,
                    training_state_root, validate_output_name)

PREVIEW_ALPHAS = (0.0, 0.7, 1.0)
PREVIEW_CFG = 7.5
PRECISIONS = {"fp32": "no", "fp16 autocast": "fp16", "bf16 autocast": "bf16"}
MODEL_DEFAULT = "model default"
# the host's config file of each text encoder (widths and layer count are read from the loaded weights)
ENCODER_CONFIGS = {"clip_l": "sd1_clip_config.json", "clip_g": "clip_config_bigg.json"}
HIDDEN_LAYER = {"last": None, "penultimate": -2}  # encoder.layer -> the host encoder's intermediate_output
END_TOKEN = 49407  # CLIP's end-of-text token: its row is the pooled output
TEXT_PARTS = ("text", "text_2")  # training's adapter parts, one per text encoder in the family's order
WRITTEN = WrittenFiles()
log = logging.getLogger("mixofshow")


# ---- the host's modules as the training loop's callables -------------------------------

def own_tensor(tensor, device, dtype):
    """A copy of a host tensor that autograd may use (made with inference mode off, it is an
    ordinary tensor); `dtype`, when given, applies to floating-point tensors."""
    dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device=device, dtype=dtype, copy=True)


def loaded_copy(skeleton, weights, device, dtype):
    """`skeleton` (built on the meta device) holding own copies of the (name, tensor) `weights`, frozen."""
    skeleton.load_state_dict({name: own_tensor(t, device, dtype) for name, t in weights}, strict=True, assign=True)
    left = [name for name, t in list(skeleton.named_parameters()) + list(skeleton.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"EDLoRA Train: the host's state has no value for {', '.join(left)}")
    return skeleton.requires_grad_(False)


def unet_copy(model, device, dtype):
    """The MODEL's UNet with every weight patch applied, as a private module with plain ops."""
    config = dict(model.model.model_config.unet_config, dtype=dtype or model.model.diffusion_model.dtype)
    with torch.no_grad():
        skeleton = type(model.model.diffusion_model)(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return loaded_copy(skeleton, compat.patched_weights(model, "diffusion_model.", device), device, dtype)


def text_encoder_copy(clip, encoder, device, dtype):
    """One of the CLIP's text transformers (families.Encoder) with every weight patch applied, as a
    private module with plain ops: the host's config of that encoder with the loaded model's widths
    and layer count."""
    transformer = getattr(clip.cond_stage_model, encoder.name).transformer
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), ENCODER_CONFIGS[encoder.name])) as f:
        config = dict(json.load(f), num_hidden_layers=transformer.num_layers,
                      hidden_size=transformer.get_input_embeddings().weight.shape[1],
                      intermediate_size=transformer.text_model.encoder.layers[0].mlp.fc1.weight.shape[0])
    with torch.no_grad():
        skeleton = type(transformer)(config, dtype or transformer.dtype, "meta", comfy.ops.disable_weight_init)
    weights = compat.patched_weights(clip.patcher, encoder.comfy_prefix, device)
    return loaded_copy(skeleton, weights, device, dtype)


def _module_name(state_key):
    return state_key[len("diffusion_model."):-len(".weight")]


def unet_lora_targets(unet, model, family):
    """{diffusers path: module}: attn1/attn2 to_q, to_k, to_v, to_out.0 of every transformer block."""
    keys = unet_weight_keys(model)
    return {path: unet.get_submodule(_module_name(keys[path]))
            for block in family.cross_attn_layers for path in family.unet_attention_layers(block)}


def text_lora_targets(transformer, family, encoder):
    """{HF path: module}: q/k/v/out_proj of every layer of one text encoder."""
    paths = family.text_lora_layers(encoder, len(transformer.text_model.encoder.layers))
    return {path: transformer.get_submodule(path) for path in paths if ".self_attn." in path}


def cross_attention_layers(unet, model, family):
    """[(to_q, to_k, heads)] of every attn2 module in layer order."""
    keys = unet_weight_keys(model)
    layers = []
    for block in family.cross_attn_layers:
        to_q = _module_name(keys[f"{block}.attn2.to_q"])
        attention = unet.get_submodule(to_q.rsplit(".", 1)[0])
        layers.append((attention.to_q, attention.to_k, attention.heads))
    return layers


def input_rows(chunk, token_table):
    """[T, D] input embeddings of a bound token chunk: ids look up the table, tensors are used as given."""
    ids = torch.tensor([t if isinstance(t, int) else 0 for t, *_ in chunk], device=token_table.device)
    rows = token_table[ids]
    spliced = [i for i, (t, *_) in enumerate(chunk) if not isinstance(t, int)]
    if not spliced:
        return rows
    values = torch.stack([chunk[i][0] for i in spliced]).to(device=rows.device, dtype=rows.dtype)
    return rows.index_put((torch.tensor(spliced, device=rows.device),), values)


def end_position(chunk):
    return next(i for i, (t, *_) in enumerate(chunk) if isinstance(t, int) and t == END_TOKEN)


def text_encoder_forward(transformer, x, encoder, ends):
    """(hidden states the UNet reads [N, T, W], pooled [N, W]) of the host text model on input
    embeddings x: causal encoder layers; the last layer's output through the final layer norm
    (SD1.5's and the original's), or the penultimate layer's as it is (SDXL); the pooled output
    is the final-layer-normed row of the end token through text_projection."""
    length = x.shape[1]
    causal = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
    last, intermediate = transformer.text_model.encoder(x, mask=causal, intermediate_output=HIDDEN_LAYER[encoder.layer])
    normed = transformer.text_model.final_layer_norm(last)
    pooled = transformer.text_projection(normed[torch.arange(len(ends), device=x.device), ends])
    return (normed if intermediate is None else intermediate), pooled


class TextConditioning(NamedTuple):
    """What the text side hands the UNet: stack [B, L, T, D] (layer l reads stack[:, l]) and the
    pooled output [B, W] of the family's last encoder (SDXL's ADM input)."""
    stack: torch.Tensor
    pooled: torch.Tensor


def encode_captions(clip, family, texts, prompts, tables, words, layer_rows):
    """(TextConditioning, positions [B, len(words)]): copy r of each prompt binds row r of every
    concept word, as EDLoRA Text Encode binds it; layer l reads copy layer_rows[l]; the pooled
    output is the copy of layer 0, as EDLoRA Text Encode's."""
    rows = len(next(iter(tables.values())))
    inputs, ends = {e.name: [] for e in family.encoders}, {e.name: [] for e in family.encoders}
    positions = []
    for prompt in prompts:
        copies, order = bound_token_copies(clip, prompt, range(rows), tables)
        for encoder, transformer in zip(family.encoders, texts):
            chunks = [copy[encoder.token_key][0] for copy in copies]
            table = transformer.text_model.embeddings.token_embedding.weight
            inputs[encoder.name].extend(input_rows(chunk, table) for chunk in chunks)
            ends[encoder.name].extend(end_position(chunk) for chunk in chunks)
        first = copies[0][family.encoders[0].token_key][0]
        spliced = [i for i, (t, *_) in enumerate(first) if not isinstance(t, int)]
        positions.append([spliced[order.index(word)] for word in words])
    hidden = []
    for encoder, transformer in zip(family.encoders, texts):
        x = torch.stack(inputs[encoder.name]) + transformer.text_model.embeddings.position_embedding.weight
        states, pooled = text_encoder_forward(transformer, x, encoder, ends[encoder.name])
        hidden.append(states)
    stack = torch.cat(hidden, dim=-1).reshape(len(prompts), rows, *hidden[0].shape[1:-1], -1)
    pooled = pooled.reshape(len(prompts), rows, -1)[:, layer_rows[0]]
    return TextConditioning(stack[:, layer_rows], pooled), torch.tensor(positions)


def default_sizes(x):
    """Size conditioning of a square canvas the size of latents x: original = target, no crop."""
    height, width = x.shape[2] * 8, x.shape[3] * 8
    return torch.tensor([[height, width, 0, 0, height, width]] * x.shape[0], dtype=torch.float32)


def adm_input(model, pooled, sizes):
    """The host model's ADM vector per image (its own encode_adm; None for models without one)."""
    vectors = [model.model.encode_adm(pooled_output=pooled[i:i + 1], height=h, width=w, crop_h=top, crop_w=left,
                                      target_height=th, target_width=tw)
               for i, (h, w, top, left, th, tw) in enumerate(sizes.tolist())]
    return None if vectors[0] is None else torch.cat(vectors).to(pooled.device)


def unet_forward(unet, model, family, x, timesteps, text, sizes=None):
    """The copy's prediction with layer l attending to text.stack[:, l] (the inference attn2 patch)
    and, on SDXL, the ADM vector of the pooled output and each image's size conditioning."""
    dtype = unet.input_blocks[0][0].weight.dtype
    stack = text.stack
    options = {"patches": {"attn2_patch": [SELECTORS[family.name]]}, CONTEXT_KEY: stack}
    y = adm_input(model, text.pooled, default_sizes(x) if sizes is None else sizes)
    return unet(x.to(dtype), timesteps.float(), context=stack[:, 0].to(dtype),
                y=None if y is None else y.to(dtype), transformer_options=options)


def vae_encoder(vae, model, device):
    def encode(images):
        with torch.inference_mode():
            latents = vae.encode(images.permute(0, 2, 3, 1).cpu())
        return model.model.process_latent_in(latents).to(device)  # a normal tensor: made outside inference mode
    return encode


def noise_schedule(model, family):
    sampling = model.model.model_sampling
    if isinstance(sampling, comfy.model_sampling.EDM) or not isinstance(sampling, comfy.model_sampling.EPS):
        raise ValueError(f"model: {type(sampling).__name__} sampling is not supported; EDLoRA Train trains "
                         f"{family.name} models with a discrete ε or v schedule")
    prediction = "v" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "eps"
    return NoiseSchedule.from_sigmas(sampling.sigmas.detach().cpu(), prediction)


def text_adapters(texts, family, rank, seed):
    """{part: (targets, adapters)}, each {HF path: module / adapter}, per text encoder: "text" the
    first (clip_l), "text_2" SDXL's clip_g; each part's initialisation is seeded by its name."""
    adapters = {}
    for part, encoder, transformer in zip(TEXT_PARTS, family.encoders, texts):
        targets = text_lora_targets(transformer, family, encoder)
        adapters[part] = (targets, make_adapters(targets, rank, seed=derived_seed(seed, "lora", part)))
    return adapters


@contextmanager
def host_training(model, clip, vae, samples, config, tables, rank, gradient_checkpointing, granularity=None):
    """An EDLoRATraining on private copies of the host's UNet and text encoders, with LoRA on
    exactly the layers the original trains; all hooks are removed on exit. `tables` have the rows
    of `granularity` (default: the family's)."""
    family = require_family(model, clip, "EDLoRA Train")
    layer_rows = family.layer_rows(granularity or family.default_granularity)
    schedule = noise_schedule(model, family)
    device = comfy.model_management.get_torch_device()
    dtype = torch.float32 if config.mixed_precision == "no" else None
    unet = unet_copy(model, device, dtype)
    texts = [text_encoder_copy(clip, encoder, device, dtype) for encoder in family.encoders]
    with torch.inference_mode():  # the host's models stay inference tensors wherever offloading moves them
        comfy.model_management.unload_all_models()  # the copies are what trains; previews reload the originals
    unet_targets = unet_lora_targets(unet, model, family)
    unet_adapters = make_adapters(unet_targets, rank, seed=derived_seed(config.seed, "lora", "unet"))
    text_parts = text_adapters(texts, family, rank, config.seed)
    probe = AttentionProbe(cross_attention_layers(unet, model, family)) if config.attn_reg_weight > 0 else None
    callables = TrainingModel(
        encode_images=vae_encoder(vae, model, device),
        encode_text=lambda prompts, t: encode_captions(clip, family, texts, prompts, t, config.words, layer_rows),
        predict=lambda x, timesteps, text, sizes=None: unet_forward(unet, model, family, x, timesteps, text, sizes),
        schedule=schedule, probe=probe)
    second = text_parts["text_2"][1] if "text_2" in text_parts else None
    training = HostTraining(family, granularity or family.default_granularity, config, samples, tables,
                            text_parts["text"][1], unet_adapters, callables, device, text_adapters_2=second,
                            norm_columns=family.encoders[0].width)
    norms = [m for module in [unet, *texts] for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    with ExitStack() as stack:
        stack.enter_context(compat.training_mode())
        stack.enter_context(attached(unet_targets, unet_adapters))
        for targets, adapters in text_parts.values():
            stack.enter_context(attached(targets, adapters))
        if probe is not None:
            stack.enter_context(probe.attached())
        # host blocks add into x in place after a norm kept x for backward: norms get copies
        stack.enter_context(cloned_inputs(norms))
        if gradient_checkpointing:
            text_layers = [layer for text in texts for layer in text.text_model.encoder.layers]
            stack.enter_context(checkpointed(blocks + text_layers))
        yield training


# ---- checks that run before any step -------------------------------------------------

def check_names(output_name, placeholder, words):
    check_output_name(output_name, "output_name")
    for word in words:
        if not CONCEPT_WORD.match(word):
            raise ValueError(f"concept word {word!r} must look like <name> (letters, digits, _ - . + only)")
    if words[0] == words[1]:
        raise ValueError(f"concept words: the two words must differ (both are {words[0]})")
    if not placeholder.strip() or any(placeholder in w or w in placeholder for w in words):
        raise ValueError(f"placeholder {placeholder!r}: must be non-empty and differ from the concept words")


def check_pth_writable(family, output_name):
    if family.name != BASE_FAMILY:
        raise ValueError(f"also_save_pth: the original Mix-of-Show .pth layout exists for SD1.5 only; turn it "
                         f"off for this {family.name} model (the .safetensors file is written as usual)")
    check_pth_replaceable(output_path(output_name), os.path.splitext(output_path(output_name))[0] + ".pth")


def check_clip(clip, family):
    """CLIP Set Last Layer only at the layer the family's UNet reads (SD1.5: -1, SDXL: -2)."""
    layer, native = getattr(clip, "layer_idx", None), {"last": -1, "penultimate": -2}[family.encoders[0].layer]
    if layer not in (None, native):
        raise ValueError(f"clip: CLIP skip ({layer}) is set; ED-LoRA trains and encodes {family.name} with "
                         f"layer {native} like the original, so remove 'CLIP Set Last Layer' before EDLoRA Train")


def check_captions_fit(clip, family, samples, config):
    """Every caption, wrapped in the longest template, must fit one 77-token window."""
    tables = {w: torch.zeros(1, family.context_dim) for w in config.words}
    template = longest_template(config.caption_template)
    for sample in samples:
        prompt = template.format(bind_placeholder(sample.caption, config.placeholder, config.words))
        try:
            copies, _ = bound_token_copies(clip, prompt, [0], tables)
        except ValueError as e:
            raise ValueError(f"{sample.name}: caption: {e}") from e
        if any(len(chunks) > 1 for chunks in copies[0].values()):
            raise ValueError(f"{sample.name}: caption is too long for the text encoder's 75 tokens once "
                             f"wrapped in a '{config.caption_template}' template; shorten it")


def initial_tables(clip, words, initializers, seed, granularity=None):
    """{word: [rows, context width]}: the initializer's row (every encoder's token row side by
    side) or a random vector in every row; rows of `granularity` (default: the family's)."""
    family = require_family(clip=clip, what="EDLoRA Train")
    token_tables = [getattr(clip.cond_stage_model, e.name).transformer.get_input_embeddings().weight
                    for e in family.encoders]

    def word_row(word):
        token = single_token_id(clip, word)
        if token is None:
            raise ValueError(f"initializer {word!r}: not a single token of this CLIP's vocabulary; "
                             f"pick a common word such as man, woman, dog")
        return torch.cat([table[token].detach().float().cpu() for table in token_tables])

    for spec in initializers:
        parse_initializer(spec)
    rows = family.num_rows(granularity or family.default_granularity)
    return {w: initial_table(spec, rows, family.context_dim, word_row, seed, w) for w, spec in zip(words, initializers)}


# ---- files ---------------------------------------------------------------------------

def edlora_folder():
    return folder_paths.get_folder_paths(EDLORA_FOLDER)[0]


def state_folder(output_name):
    return os.path.join(training_state_root(), output_name)


def output_path(output_name):
    return os.path.join(edlora_folder(), f"{output_name}.safetensors")


def state_path(output_name, step):
    return os.path.join(state_folder(output_name), f"state-{step:06d}.safetensors")


def resolve_resume(resume, output_name):
    """None, or the state file `resume` names: "latest", or a path in the training-state folder
    (relative to output_name's own state folder)."""
    resume = resume.strip()
    if not resume:
        return None
    if resume == "latest":
        found = sorted(glob.glob(os.path.join(glob.escape(state_folder(output_name)), "state-*.safetensors")))
        if not found:
            raise TrainingStateError(f"resume: no saved state of {output_name!r} in output/{STATE_FOLDER}")
        return found[-1]
    path = inside(training_state_root(), resume, "resume", f"output/{STATE_FOLDER}", base=state_folder(output_name))
    if not os.path.isfile(path):
        raise TrainingStateError(f"resume: {os.path.relpath(path, training_state_root())} is not a saved state "
                                 f"in output/{STATE_FOLDER}")
    return path


class HostTraining(EDLoRATraining):
    """EDLoRATraining on a host model of `family` (families.Family), its tables at `granularity`."""

    def __init__(self, family, granularity, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family, self.granularity = family, granularity


def trained_edlora(training, name):
    def layers(part):
        if part not in training.adapters:
            return {}
        return {path: LoRALayer(down, up) for path, (down, up) in training.lora_weights(part).items()}
    return EDLoRA(training.tables(), layers("unet"), layers("text"), name, family=training.family.name,
                  granularity=training.granularity, text_encoder_2=layers("text_2"))


def save_outputs(edlora, path, also_pth):
    if also_pth:
        save_edlora_with_pth(edlora, path, os.path.splitext(path)[0] + ".pth")
    else:
        save_edlora(edlora, path)
    WRITTEN.record(path)


def save_state(training, output_name, dataset_names):
    path = state_path(output_name, training.step)
    save_training_state(path, *training.state(dataset_names))
    return path


def folder_fingerprint(*folders):
    digest = hashlib.sha256()
    for folder in folders:
        if folder and os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                stat = os.stat(os.path.join(folder, name))
                digest.update(f"{folder}/{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


# ---- previews and progress -----------------------------------------------------------

def preview_images(model, clip, vae, edlora, prompt, steps, resolution, seed):
    """[3, H, W, 3]: the prompt sampled with the ED-LoRA at α 0 (embeddings only), 0.7 and 1.0."""
    latent = torch.zeros(1, 4, resolution // 8, resolution // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    images = []
    with torch.inference_mode():
        for alpha in PREVIEW_ALPHAS:
            patched_model, patched_clip = apply_edlora(model, clip, edlora, alpha, alpha)
            positive, negative = (sized(encode_layerwise(patched_clip, text), resolution) for text in (prompt, ""))
            samples = comfy.sample.sample(patched_model, noise, steps, PREVIEW_CFG, "euler", "normal", positive,
                                          negative, latent, seed=seed, disable_pbar=True)
            images.append(vae.decode(samples).float().cpu())
        return torch.cat(images)


def sized(conditioning, resolution):
    """The conditioning with the size conditioning CLIPTextEncodeSDXL gives a square canvas
    (only size-conditioned models read it)."""
    size = {"width": resolution, "height": resolution, "crop_w": 0, "crop_h": 0,
            "target_width": resolution, "target_height": resolution}
    return [[cond, {**options, **size}] for cond, options in conditioning]


def curve_image(training, loss=None):
    caption = "" if loss is None else f"loss {loss:.4f}  (light: per step, dark: moving average)"
    return torch.from_numpy(loss_curve(training.losses, training.config.total_steps, caption=caption))


class TrainingProgress:
    """ProgressBar whose preview is the loss curve with the current loss written on it."""

    def __init__(self, training, name):
        self.total, self.name = training.config.total_steps, name
        self.every = max(1, self.total // 50)
        self.bar = comfy.utils.ProgressBar(self.total)
        self.bar.update_absolute(training.step, self.total)

    def __call__(self, training, loss, norm):
        preview = None
        if training.step % self.every == 0 or training.step == self.total:
            pixels = (curve_image(training, loss).numpy() * 255).astype(np.uint8)
            preview = ("PNG", Image.fromarray(pixels), 512)
            log.info("EDLoRA Train %s: step %d/%d loss %.4f embedding norm %.3f%s", self.name, training.step,
                     self.total, loss, norm, " (embeddings frozen)" if training.frozen else "")
        self.bar.update_absolute(training.step, self.total, preview)


class EDLoRATrain:
    DESCRIPTION = ("Trains one concept as a Mix-of-Show ED-LoRA (the paper's single-client stage): two concept "
                   "words with one embedding per cross-attention layer, plus rank-r LoRA on the text encoder's "
                   "attention and the UNet's attention layers, with the original's defaults. Writes "
                   "models/edlora/<output_name>.safetensors for 'EDLoRA Loader' and gradient fusion. The "
                   "interrupt button stops cleanly and saves a state that 'resume' = latest continues exactly.")
    CATEGORY = "mixofshow/train"
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("edlora_name", "loss_curve", "previews")
    OUTPUT_TOOLTIPS = ("File name of the trained ED-LoRA in models/edlora.",
                       "Loss per step and its moving average.",
                       "The preview prompt at α 0 (embeddings only), 0.7 and 1.0, every preview_every steps and at the end.")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        def number(kind, default, low, high, step, tip):
            return (kind, {"default": default, "min": low, "max": high, "step": step, "tooltip": tip})

        return {"required": {
            "model": ("MODEL", {"tooltip": "SD1.5 or SDXL model to train on (weight patches such as LoRAs are included)."}),
            "clip": ("CLIP", {"tooltip": "Its CLIP (SDXL: clip_l and clip_g, both trained)."}),
            "vae": ("VAE", {"tooltip": "Its VAE; encodes the training images."}),
            "dataset_folder": ("STRING", {"default": "", "tooltip": "Folder of images with same-name .txt captions "
                                          "(first line) that contain the placeholder; an image without caption is "
                                          "captioned with the placeholder alone. A folder inside ComfyUI's input "
                                          "folder, e.g. my_concept; nothing outside it is read."}),
            "placeholder": ("STRING", {"default": "<TOK>", "tooltip": "What captions write for the concept; replaced "
                                       "by the two concept words."}),
            "concept_word_1": ("STRING", {"default": "<concept1>", "tooltip": "First concept word (the original's "
                                          "'adjective' word, attention kept inside the mask)."}),
            "concept_word_2": ("STRING", {"default": "<concept2>", "tooltip": "Second concept word (the class-anchored word)."}),
            "initializer_1": ("STRING", {"default": "<rand-0.013>", "tooltip": "<rand-σ> for a random start, or one "
                                         "existing word whose embedding is copied to every layer row."}),
            "initializer_2": ("STRING", {"default": "man", "tooltip": "Like initializer_1; the original uses the class "
                                         "word (man, woman, dog, ...)."}),
            "steps": number("INT", 0, 0, 1000000, 1, "Training steps; 0 counts them like the original: "
                            "images × repeats / batch size."),
            "repeats": number("INT", 500, 1, 100000, 1, "Dataset repeats when steps is 0 (original: 500, 250 for some)."),
            "batch_size": number("INT", 2, 1, 64, 1, "Images per step (original: 2 per GPU on 2 GPUs)."),
            "resolution": number("INT", 512, 64, 2048, 64, "Square training canvas in pixels, a multiple of 64 (the original: 512 on SD1.5; SDXL's native 1024)."),
            "lr_embedding": number("FLOAT", 1e-3, 0.0, 1.0, 1e-5, "Learning rate of the concept embeddings."),
            "lr_text_encoder": number("FLOAT", 1e-5, 0.0, 1.0, 1e-6, "Learning rate of the text-encoder LoRA."),
            "lr_unet": number("FLOAT", 1e-4, 0.0, 1.0, 1e-5, "Learning rate of the UNet LoRA."),
            "rank": number("INT", 4, 1, 128, 1, "LoRA rank (ΔW = up·down, no division by rank)."),
            "noise_offset": number("FLOAT", 0.01, 0.0, 1.0, 0.005, "Per image and channel noise offset."),
            "masked_loss": ("BOOLEAN", {"default": True, "tooltip": "Weight the loss by the concept masks (needs a "
                                        "masks folder); otherwise by the image area inside the padded canvas."}),
            "attn_reg_weight": number("FLOAT", 0.01, 0.0, 10.0, 0.001, "Attention regulariser weight: penalises "
                                      "the concept words' cross-attention outside the mask (0 disables it)."),
            "reg_full_identity": ("BOOLEAN", {"default": False, "tooltip": "Make the second word's attention match "
                                              "the whole mask (original: on for thanos) instead of only staying inside."}),
            "emb_norm_threshold": number("FLOAT", 0.55, 0.0, 100.0, 0.01, "Embeddings freeze once the mean norm of "
                                         "their rows reaches this; the LoRAs keep training."),
            "caption_template": (list(CAPTION_TEMPLATES), {"default": "human", "tooltip": "Template set each caption "
                                 "is wrapped in ('a photo of {}' and variations); none uses captions as they are."}),
            "shuffle_caption": ("BOOLEAN", {"default": True, "tooltip": "Shuffle the comma-separated parts after the first."}),
            "seed": number("INT", 0, 0, 0xFFFFFFFFFFFFFFFF, 1, "Seeds initialisation, batches, augmentation and noise."),
            "save_every": number("INT", 0, 0, 1000000, 1, "Save a resumable state and an intermediate ED-LoRA every N "
                                 "steps (0: only at the end and on interrupt)."),
            "output_name": ("STRING", {"default": "my_concept", "tooltip": "Writes models/edlora/<name>.safetensors "
                                       "(overwritten if it exists): letters, digits, spaces, - _ . only, at most "
                                       "100 bytes, not starting with '.'."}),
            "preview_every": number("INT", 0, 0, 1000000, 1, "Preview images every N steps (0: only at the end)."),
            "preview_prompt": ("STRING", {"default": "a photo of <TOK>", "multiline": True,
                                          "tooltip": "Prompt of the previews; the placeholder becomes the concept words."}),
            "preview_steps": number("INT", 20, 1, 200, 1, "Sampling steps per preview image (euler, CFG 7.5)."),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute activations in backward: "
                                                   "less memory, slower steps."}),
            "precision": (list(PRECISIONS), {"default": "fp32", "tooltip": "fp32, or fp16/bf16 autocast for GPUs "
                                             "(LoRA and embeddings stay fp32)."}),
            "also_save_pth": ("BOOLEAN", {"default": False, "tooltip": "Also write the original Mix-of-Show .pth layout; "
                                          "an existing <name>.pth this node did not write is never replaced."}),
        }, "optional": {
            "masks_folder": ("STRING", {"default": "", "tooltip": "Optional folder of same-name masks (white = concept), "
                                        "each the size of its image; a folder inside the input folder, e.g. my_concept/masks."}),
            "resume": ("STRING", {"default": "", "tooltip": "Empty: start fresh. 'latest': continue the newest saved "
                                  "state of output_name. Or a state file inside output/edlora_training, relative to "
                                  "output_name's own folder there (e.g. state-000100.safetensors)."}),
            "granularity": ([MODEL_DEFAULT, *GRANULARITIES], {"default": MODEL_DEFAULT, "tooltip": "Embedding rows "
                            "per concept word: one per transformer block ('block', Mix-of-Show's; SDXL: 70) or per "
                            "spatial transformer ('transformer'; SDXL: 11, about 6x less text-encoder work per step). "
                            "The same on SD1.5. The file records it."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None):
        return validate_output_name(output_name)

    @classmethod
    def IS_CHANGED(cls, dataset_folder="", masks_folder="", resume="", output_name="", **kwargs):
        """The inputs' folders, and NaN (always re-run) once the ED-LoRA this node wrote is gone."""
        try:
            check_output_name(output_name, "output_name")
            folders = input_folder(dataset_folder, "dataset_folder"), input_folder(masks_folder, "masks_folder")
        except ValueError:
            return float("nan")  # the node reports it
        if not WRITTEN.intact(output_path(output_name)):
            return float("nan")
        resumed = state_folder(output_name) if resume.strip() == "latest" else None
        return folder_fingerprint(*folders, resumed)

    def train(self, model, clip, vae, dataset_folder, placeholder, concept_word_1, concept_word_2, initializer_1,
              initializer_2, steps, repeats, batch_size, resolution, lr_embedding, lr_text_encoder, lr_unet, rank,
              noise_offset, masked_loss, attn_reg_weight, reg_full_identity, emb_norm_threshold, caption_template,
              shuffle_caption, seed, save_every, output_name, preview_every, preview_prompt, preview_steps,
              gradient_checkpointing, precision, also_save_pth, masks_folder="", resume="", granularity=MODEL_DEFAULT):
        words = (concept_word_1.strip(), concept_word_2.strip())
        check_names(output_name, placeholder, words)
        folders = input_folder(dataset_folder, "dataset_folder"), input_folder(masks_folder, "masks_folder")
        family = require_family(model, clip, "EDLoRA Train")
        if also_save_pth:
            check_pth_writable(family, output_name)
        check_clip(clip, family)
        if resolution % 64:
            raise ValueError(f"resolution {resolution}: must be a multiple of 64")
        samples = load_dataset(folders[0], placeholder, resolution, folders[1] or None)
        config = TrainingConfig(
            total_steps=steps or steps_for_repeats(len(samples), repeats, batch_size), words=words,
            placeholder=placeholder, batch_size=batch_size, resolution=resolution, lr_embedding=lr_embedding,
            lr_text_lora=lr_text_encoder, lr_unet_lora=lr_unet, noise_offset=noise_offset, masked_loss=masked_loss,
            attn_reg_weight=attn_reg_weight, reg_full_identity=reg_full_identity,
            emb_norm_threshold=emb_norm_threshold, caption_template=caption_template,
            shuffle_caption=shuffle_caption, seed=seed, mixed_precision=PRECISIONS[precision])
        check_captions_fit(clip, family, samples, config)
        granularity = family.default_granularity if granularity == MODEL_DEFAULT else granularity
        tables = initial_tables(clip, words, (initializer_1, initializer_2), seed, granularity)
        resume_path = resolve_resume(resume, output_name)
        run = TrainingRun(model, clip, vae, samples, config, output_name, also_save_pth, granularity)
        with torch.inference_mode(False), torch.enable_grad():
            return run.execute(tables, rank, gradient_checkpointing, resume_path, save_every, preview_every,
                               bind_placeholder(preview_prompt, placeholder, words), preview_steps)


class TrainingRun:
    """One execution of the node: train, save periodically and on interrupt, preview, write."""

    def __init__(self, model, clip, vae, samples, config, output_name, also_save_pth, granularity):
        self.model, self.clip, self.vae, self.samples, self.granularity = model, clip, vae, samples, granularity
        self.config, self.output_name, self.also_save_pth = config, output_name, also_save_pth
        self.names = [s.name for s in samples]
        self.previews = []

    def execute(self, tables, rank, gradient_checkpointing, resume_path, save_every, preview_every, prompt,
                preview_steps):
        with host_training(self.model, self.clip, self.vae, self.samples, self.config, tables, rank,
                           gradient_checkpointing, self.granularity) as training:
            if resume_path is not None:
                training.restore(*load_training_state(resume_path), self.names, resume_path)
            try:
                self.train(training, save_every, preview_every, prompt, preview_steps)
                return self.write(training, prompt, preview_steps)
            except comfy.model_management.InterruptProcessingException:
                # a step interrupted inside its forward or backward has not changed what training holds
                log.info("EDLoRA Train %s: interrupted, state at step %d saved to %s", self.output_name,
                         training.step, save_state(training, self.output_name, self.names))
                raise

    def train(self, training, save_every, preview_every, prompt, preview_steps):
        progress = TrainingProgress(training, self.output_name)

        def on_step(training, loss, norm):
            progress(training, loss, norm)
            if training.step < self.config.total_steps:
                if save_every and training.step % save_every == 0:
                    self.save_intermediate(training)
                if preview_every and training.step % preview_every == 0:
                    self.preview(training, prompt, preview_steps)

        # the host's own check before each step: it raises the interrupt exception, as its progress hook does
        run_training(training, on_step, comfy.model_management.throw_exception_if_processing_interrupted)

    def write(self, training, prompt, preview_steps):
        path = output_path(self.output_name)
        save_outputs(trained_edlora(training, os.path.basename(path)), path, self.also_save_pth)
        self.preview(training, prompt, preview_steps)
        name = os.path.basename(path)
        return {"ui": {"text": [name]}, "result": (name, curve_image(training)[None], torch.cat(self.previews))}

    def save_intermediate(self, training):
        save_state(training, self.output_name, self.names)
        name = f"{self.output_name}-{training.step:06d}.safetensors"
        path = os.path.join(edlora_folder(), f"{self.output_name}_steps", name)
        save_outputs(trained_edlora(training, name), path, self.also_save_pth)

    def preview(self, training, prompt, steps):
        edlora = trained_edlora(training, f"{self.output_name} (step {training.step})")
        self.previews.append(preview_images(self.model, self.clip, self.vae, edlora, prompt, steps,
                                            self.config.resolution, self.config.seed))
