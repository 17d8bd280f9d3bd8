"""Activation capture for gradient fusion: each fused layer's input rows stream into a Gram
matrix while the host runs its own text encoder and sampler (nothing is stored).

Inputs follow Mix-of-Show's three stages (notes §3.3):
  A. text encoder: every token position of the 16 layer copies of "photo of a {words}" and
     "{words}", through concept i's own LoRA-merged encoder. All 77 positions count, padding
     included: the UNet attends to all of them and (causal attention) the padding states carry
     the prompt. (The original encoded unpadded prompts and so fitted only BOS … EOS.)
  B. cross-attention k/v of layer l: the fused encoder's layer-l copies of the same prompts,
     at every position the UNet attends to ("all", default) or, as the original, only at the
     concept tokens and the end-of-text token ("concept_and_eos", 6 rows per concept and layer);
     an ordinary LoRA's concept tokens are its trigger words' tokens (and embedding tokens);
  C. every other fused UNet layer: inputs while sampling "photo of a {words}" for the capture
     steps, no CFG, seeded, with concept i's UNet LoRA over the fused encoder and k/v.
"""
import comfy.model_management
import comfy.sample
import comfy.utils
import torch

from ..mixofshow_core import sd15
from ..mixofshow_core.fusion_solver import GramAccumulator
from .edlora_text_encode import bound_copies, encode_layerwise

TEXT_PREFIX = "clip_l.transformer."


def fusion_prompts(words):
    phrase = " ".join(words)
    return [f"photo of a {phrase}", phrase]


class GramHooks:
    """Forward pre-hooks accumulating input Grams of modules {name: module}. Hooks are removed
    on exit (clones share modules)."""

    def __init__(self, modules):
        self.modules = modules
        self.grams = {}
        self.handles = []

    def _hook(self, name):
        def record(module, args):
            x = args[0]
            if x.dim() == 4:  # 1x1 conv input [B, C, H, W] -> rows of C
                x = x.movedim(1, -1)
            self.grams.setdefault(name, GramAccumulator(x.shape[-1])).add(x)
        return record

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def text_modules(clip, paths):
    return {p: comfy.utils.get_attr(clip.cond_stage_model, TEXT_PREFIX + p) for p in paths}


def unet_modules(model, paths, key_of):
    return {p: comfy.utils.get_attr(model.model, key_of[p][: -len(".weight")]) for p in paths}


def valid_length(chunk):
    """Tokens up to and including the first end token (the padding after it does not count)."""
    end = chunk[-1][0]
    return next(i for i, (token, *_) in enumerate(chunk) if i > 0 and isinstance(token, int) and token == end) + 1


def layer_copies(clip, words):
    """All 16 layer copies of both fusion prompts, one 77-token chunk each."""
    sections = []
    for prompt in fusion_prompts(words):
        copies, _ = bound_copies(clip, prompt, range(sd15.NUM_CROSS_ATTN_LAYERS))
        sections += [copy[0] for copy in copies]
    return sections


def capture_text_encoder(clip, words, paths):
    """Stage A Grams {path: GramAccumulator} on `clip` (concept i's LoRA-merged encoder), one per
    distinct layer input (q/k/v share theirs)."""
    with GramHooks(text_modules(clip, sorted({sd15.input_group(p) for p in paths}))) as hooks:
        clip.encode_from_tokens({"l": layer_copies(clip, words)})
    return {p: hooks.grams[sd15.input_group(p)] for p in paths}


KV_POSITIONS = ("all", "concept_and_eos")


def phrase_token_ids(clip, phrases):
    """The token ids of each plain-text phrase (between the start and end tokens)."""
    ids = ([token for token, *_ in clip.tokenize(phrase)["l"][0]] for phrase in phrases)
    return [chunk[1:chunk.index(chunk[-1], 1)] for chunk in ids]


def kv_positions(chunk, positions, phrases=()):
    """Positions the k/v fit sees: all, or the concept tokens (embedding tokens and the runs of
    `phrases` token ids, an ordinary LoRA's trigger words) and the end token."""
    if positions == "all":
        return list(range(len(chunk)))
    tokens = [token if isinstance(token, int) else None for token, *_ in chunk]
    marked = {i for i, token in enumerate(tokens) if token is None}
    for ids in filter(None, phrases):
        for start in range(len(tokens) - len(ids) + 1):
            if tokens[start:start + len(ids)] == ids:
                marked.update(range(start, start + len(ids)))
    return sorted(marked) + [valid_length(chunk) - 1]


def kv_inputs(fused_clip, words, positions="all", triggers=()):
    """Stage B rows per layer: [16] tensors [rows, 768] of both prompts' layer-l copies."""
    sections = layer_copies(fused_clip, words)
    out = fused_clip.encode_from_tokens({"l": sections}).reshape(len(sections), -1, sd15.TEXT_DIM)
    layers, phrases = sd15.NUM_CROSS_ATTN_LAYERS, phrase_token_ids(fused_clip, triggers)
    rows = [[] for _ in range(layers)]
    for index, chunk in enumerate(sections):
        rows[index % layers].append(out[index, kv_positions(chunk, positions, phrases)])
    return [torch.cat(r).float() for r in rows]


def capture_spatial(model, clip, words, paths, key_of, steps, resolution, seed, on_step):
    """Stage C Grams from sampling "photo of a {words}" with `model`, no CFG, seeded."""
    positive = encode_layerwise(clip, fusion_prompts(words)[0])
    size = max(resolution // 8, 1)
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, size, size), seed)

    def callback(step, x0, x, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        on_step()

    modules = unet_modules(model, sorted({sd15.input_group(p) for p in paths}), key_of)
    with GramHooks(modules) as hooks:
        comfy.sample.sample(model, noise, steps, 1.0, "dpmpp_2m", "normal", positive, positive,
                            torch.zeros_like(noise), seed=seed, callback=callback, disable_pbar=True)
    return {p: hooks.grams[sd15.input_group(p)] for p in paths}
