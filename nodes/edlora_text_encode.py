"""EDLoRA Text Encode: one text encoding per UNet cross-attention layer."""
import torch

from ..mixofshow_core import sd15
from ..mixofshow_core.prompt_binding import (bind_layer, check_prompt_chunks, concept_words_in, count_token,
                                             distinct_layers, replace_concept_words)
from .concepts import concepts_of
from .layerwise import CONTEXT_KEY, context_cond
from .model_keys import require_sd15

# Single-token words that stand in for concept words while the host tokenizer runs;
# the first one that does not already occur in the prompt is used.
SENTINEL_WORDS = ("walrus", "harpsichord", "zeppelin", "kazoo", "marmot", "ocelot", "toucan", "yodel")

# Token chunks the CLIP encodes in one forward: the 16 layer copies of a 4-chunk prompt.
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
    check_prompt_chunks(tokens["l"])
    return clip.encode_from_tokens(tokens, return_pooled=True)


def encode_chunks(clip, chunks):
    """([1, len(chunks) * 77, D] context, pooled of the first chunk): encode_from_tokens over the
    chunks, ENCODE_BATCH at a time (chunks are encoded independently, so batching changes nothing)."""
    encoded = [clip.encode_from_tokens({"l": chunks[start:start + ENCODE_BATCH]}, return_pooled=True)
               for start in range(0, len(chunks), ENCODE_BATCH)]
    return torch.cat([cond for cond, _ in encoded], dim=1), encoded[0][1]


def bound_copies(clip, text, layers, embeddings=None):
    """Token chunks of the prompt's copies `layers` (copy l binds row l of each concept word).

    embeddings: word -> [16, D] tables; by default the concepts registered on the CLIP."""
    embeddings = concepts_of(clip).embedding_map() if embeddings is None else embeddings
    stripped = replace_concept_words(text, embeddings.keys(), "")[0]
    sentinel, sentinel_id = pick_sentinel(clip, stripped)
    replaced, words = replace_concept_words(text, embeddings.keys(), sentinel)
    tokens = clip.tokenize(replaced)
    check_prompt_chunks(tokens["l"])
    if count_token(tokens["l"], sentinel_id) != len(words):
        raise ValueError(f"text: a concept word is glued to other characters; put spaces around {words[0]}")
    return [bind_layer(tokens["l"], sentinel_id, words, embeddings, layer) for layer in layers], words


def encode_layerwise(clip, text):
    """CONDITIONING whose model_conds carry a [1, 16, T, D] stack: copy l binds row l of every
    concept word (Mix-of-Show's bind_concept_prompt), the copies' chunks in batched forwards.

    The ordinary context is copy 0, so ControlNet and stock nodes see a normal 77-token cond.
    A prompt without concept words encodes exactly like CLIPTextEncode; when the CLIP carries
    concepts it still gets a (uniform) stack so it batches with layer-wise prompts."""
    require_sd15(clip=clip, what="EDLoRA Text Encode")
    concepts = concepts_of(clip)
    if not concept_words_in(text):
        cond, pooled = encode_plain(clip, text)
        stack = cond.unsqueeze(1).expand(-1, sd15.NUM_CROSS_ATTN_LAYERS, -1, -1)
        return _conditioning(cond, pooled, stack if concepts.words else None)
    words = set(concept_words_in(text)) & set(concepts.words)
    layers, index_of = distinct_layers(concepts.embedding_map(), words, sd15.NUM_CROSS_ATTN_LAYERS)
    copies, _ = bound_copies(clip, text, layers)
    cond, pooled = encode_chunks(clip, [chunk for copy in copies for chunk in copy])
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
            "clip": ("CLIP", {"tooltip": "A CLIP from 'EDLoRA Loader' (or any SD1.5 CLIP for plain prompts)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "Prompt; write concepts by their words, e.g. 'a photo of <potter1> "
                                           "<potter2>'. Weights like (word:1.2) work as usual."}),
        }}

    def encode(self, clip, text):
        return (encode_layerwise(clip, text),)
