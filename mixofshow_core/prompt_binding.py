"""Layer-wise prompt binding (Mix-of-Show `bind_concept_prompt`), tokenizer-agnostic.

Mix-of-Show replicates a prompt once per cross-attention layer and, in copy l, replaces
every concept word by its layer-l embedding. Here each concept word in the text is first
swapped for a sentinel word that the host tokenizer turns into one known token id; after
tokenizing (so the host's weight syntax, long-prompt chunking and padding all apply), the
n-th sentinel token is replaced by the n-th concept word's layer-l embedding row.
"""
import re

import torch

CONCEPT_PATTERN = re.compile(r"<[\w\-.+]+>")

# Chunks (75 tokens each, 77 with start and end) one prompt may hold: about 4,800 tokens, far
# beyond CLIP's useful context; each chunk of a concept prompt is encoded once per layer copy.
MAX_PROMPT_CHUNKS = 64


class UnknownConceptError(ValueError):
    """A prompt names a concept word that no loaded ED-LoRA provides."""


def concept_words_in(text):
    """Every <word> in the text, in order of appearance."""
    return CONCEPT_PATTERN.findall(text)


def replace_concept_words(text, known_words, sentinel):
    """(text with each concept word replaced by ' sentinel ', the words in order).

    Raises UnknownConceptError for a <word> no concept provides."""
    found = concept_words_in(text)
    unknown = sorted({w for w in found if w not in known_words})
    if unknown:
        known = ", ".join(sorted(known_words)) or "none (connect an EDLoRA Loader)"
        raise UnknownConceptError(f"text: unknown concept word {', '.join(unknown)}; known words: {known}")
    return CONCEPT_PATTERN.sub(f" {sentinel} ", text), found


def bind_layer(token_chunks, sentinel_id, word_order, embeddings, layer):
    """Token chunks for copy `layer`: the n-th sentinel becomes word_order[n]'s row `layer`.

    token_chunks: list of chunks, each a list of (token, weight) pairs as ComfyUI tokenizes.
    embeddings: word -> [num_layers, dim] tensor."""
    position = 0
    bound = []
    for chunk in token_chunks:
        out = []
        for token, weight, *rest in chunk:
            if isinstance(token, int) and token == sentinel_id:
                token = embeddings[word_order[position]][layer]
                position += 1
            out.append((token, weight, *rest))
        bound.append(out)
    if position != len(word_order):
        raise ValueError(f"text: found {position} concept tokens after tokenizing, expected {len(word_order)}")
    return bound


def check_prompt_chunks(token_chunks, label="text"):
    """Refuses a tokenized prompt (a list of chunks) longer than MAX_PROMPT_CHUNKS."""
    if len(token_chunks) > MAX_PROMPT_CHUNKS:
        raise ValueError(f"{label}: {len(token_chunks)} chunks of 75 tokens, more than the {MAX_PROMPT_CHUNKS} a "
                         f"prompt may hold (about {MAX_PROMPT_CHUNKS * 75} tokens); shorten it")


def count_token(token_chunks, token_id):
    return sum(1 for chunk in token_chunks for token, *_ in chunk if isinstance(token, int) and token == token_id)


def distinct_layers(embeddings, words, num_layers):
    """Groups layers whose rows are identical for every word: (unique layer list, index map).

    Copies of a prompt that bind identical rows encode identically, so only one needs encoding."""
    unique, index_of = [], []
    for layer in range(num_layers):
        for u, rep in enumerate(unique):
            if all(torch.equal(embeddings[w][layer], embeddings[w][rep]) for w in words):
                index_of.append(u)
                break
        else:
            index_of.append(len(unique))
            unique.append(layer)
    return unique, index_of
