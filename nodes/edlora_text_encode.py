"""EDLoRA Text Encode: one text encoding per UNet cross-attention layer.

Works for every model family (mixofshow_core.families): a concept word's per-layer table has the
encoders' widths side by side (SDXL: clip_l 768 ‖ clip_g 1280), and each encoder's token list gets
its own columns, so the host's encode concatenates them into the family's context as usual."""
import torch

from ..mixofshow_core.prompt_binding import (bind_layer, check_prompt_chunks, concept_words_in, count_token,
                                             distinct_layers, replace_concept_words)
from .concepts import concepts_of
from .layerwise import CONTEXT_KEY, context_cond
from .model_keys import clip_family, require_family

# Single-token words that stand in for concept words while the host tokenizer runs;
# the first one that does not already occur in the prompt is used.
SENTINEL_WORDS = ("walrus", "harpsichord", "zeppelin", "kazoo", "marmot", "ocelot", "toucan", "yodel")

# Token chunks the CLIP encodes in one forward: the 16 SD1.5 layer copies of a 4-chunk prompt.
ENCODE_BATCH = 64


def single_token_id(clip, word):
    """The token id of `word` if the tokenizer keeps it as one token, else None."""
    ids = [t for t, *_ in clip.tokenize(word)["l"][0]]
    body = ids[1:ids.index(ids[-1])]  # between the start token and the end/pad token
    return body[0] if len(body) == 1 else None


def pick_sentinel(clip, text_without_concepts):
    used = {t for chunk in clip.tokenize(text_without_concepts)["l"] for t, *_ in chunk if isinstance(t, int)}
    for word in SENTINEL_WORDS:
        token = single_token_id(clip, word)
        if token is not None and token not in used:
            return word, token
    raise ValueError("text: every sentinel word already occurs in the prompt; rephrase it")


def encode_plain(clip, text):
    """Exactly what CLIPTextEncode produces: ([1, T, D] context, pooled)."""
    tokens = clip.tokenize(text)
    for chunks in tokens.values():
        check_prompt_chunks(chunks)
    return clip.encode_from_tokens(tokens, return_pooled=True)


def encode_chunks(clip, copies):
    """([1, chunks * 77, D] context, pooled of the first chunk) of token copies ({token key: chunks}
    each, see bound_token_copies), every copy's chunks in order, ENCODE_BATCH chunks per forward
    (chunks are encoded independently, so batching changes nothing)."""
    flat = {key: [chunk for copy in copies for chunk in copy[key]] for key in copies[0]}
    total = len(next(iter(flat.values())))
    encoded = [clip.encode_from_tokens({key: chunks[start:start + ENCODE_BATCH] for key, chunks in flat.items()},
                                       return_pooled=True)
               for start in range(0, total, ENCODE_BATCH)]
    return torch.cat([cond for cond, _ in encoded], dim=1), encoded[0][1]


def bound_token_copies(clip, text, layers, embeddings=None):
    """The prompt's copies `layers` as token dicts {token key: chunks}, as clip.tokenize gives:
    in copy l each concept word is its layer-l row, each encoder's token list getting that
    encoder's columns of the row.

    embeddings: word -> [layers, context width] tables; by default the concepts registered on the CLIP."""
    family = clip_family(clip)
    embeddings = concepts_of(clip).embedding_map() if embeddings is None else embeddings
    stripped = replace_concept_words(text, embeddings.keys(), "")[0]
    sentinel, sentinel_id = pick_sentinel(clip, stripped)
    replaced, words = replace_concept_words(text, embeddings.keys(), sentinel)
    tokens = clip.tokenize(replaced)
    columns, start = {}, 0
    for encoder in family.encoders:
        chunks = tokens[encoder.token_key]
        check_prompt_chunks(chunks)
        if count_token(chunks, sentinel_id) != len(words):
            raise ValueError(f"text: a concept word is glued to other characters; put spaces around {words[0]}")
        columns[encoder.token_key] = {w: e[:, start:start + encoder.width] for w, e in embeddings.items()}
        start += encoder.width
    return [{key: bind_layer(tokens[key], sentinel_id, words, columns[key], layer) for key in columns}
            for layer in layers], words


def bound_copies(clip, text, layers, embeddings=None):
    """The first text encoder's token chunks of each copy in `layers` (SD1.5's whole prompt)."""
    copies, words = bound_token_copies(clip, text, layers, embeddings)
    key = clip_family(clip).encoders[0].token_key
    return [copy[key] for copy in copies], words


def encode_layerwise(clip, text):
    """CONDITIONING whose model_conds carry a [1, L, T, D] stack (SD1.5 [1, 16, T, 768], SDXL
    [1, 70, T, 2048]): copy l binds row l of every concept word (Mix-of-Show's
    bind_concept_prompt), the copies' chunks in batched forwards; copies whose rows are all
    equal (e.g. the 7 blocks of one SDXL spatial transformer at that granularity) encode once.

    The ordinary context is copy 0, so ControlNet and stock nodes see a normal 77-token cond;
    the pooled output (SDXL's ADM input) is copy 0's, as CLIPTextEncode gives it for a prompt.
    A prompt without concept words encodes exactly like CLIPTextEncode; when the CLIP carries
    concepts it still gets a (uniform) stack so it batches with layer-wise prompts."""
    family = require_family(clip=clip, what="EDLoRA Text Encode")
    concepts = concepts_of(clip)
    if not concept_words_in(text):
        cond, pooled = encode_plain(clip, text)
        stack = cond.unsqueeze(1).expand(-1, family.num_cross_attn_layers, -1, -1)
        return _conditioning(cond, pooled, stack if concepts.words else None)
    words = set(concept_words_in(text)) & set(concepts.words)
    layers, index_of = distinct_layers(concepts.embedding_map(), words, family.num_cross_attn_layers)
    copies, _ = bound_token_copies(clip, text, layers)
    cond, pooled = encode_chunks(clip, copies)
    per_layer = cond.reshape(cond.shape[0], len(layers), -1, cond.shape[-1])
    stack = per_layer[:, index_of]
    return _conditioning(stack[:, 0], pooled, stack)


def _conditioning(cond, pooled, stack):
    options = {"pooled_output": pooled}
    if stack is not None:
        options["model_conds"] = {CONTEXT_KEY: context_cond(stack)}
    return [[cond, options]]


class EDLoRATextEncode:
    DESCRIPTION = ("Encodes a prompt that may contain ED-LoRA concept words (e.g. '<potter1> <potter2>') "
                   "once per UNet cross-attention layer, binding each word's layer-l embedding in copy l, "
                   "as Mix-of-Show does. Works with any sampler when the MODEL comes from an EDLoRA node. "
                   "Prompts without concept words give exactly what CLIPTextEncode gives.")
    CATEGORY = "mixofshow"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Conditioning with one text encoding per cross-attention layer.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "A CLIP from 'EDLoRA Loader' (or any SD1.5 / SDXL CLIP for plain prompts)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "Prompt; write concepts by their words, e.g. 'a photo of <potter1> "
                                           "<potter2>'. Weights like (word:1.2) work as usual."}),
        }}

    def encode(self, clip, text):
        return (encode_layerwise(clip, text),)
