"""The concept words a CLIP knows, carried in its patcher's model_options.

model_options survives CLIP.clone() (stock LoRA loaders clone the CLIP), so concepts stay
attached through any chain of nodes. ConceptSet is immutable and shared between clones.
"""
from dataclasses import dataclass

import torch

from ..mixofshow_core.families import SD15
from ..mixofshow_core.edlora_format import CONCEPT_WORD
from ..mixofshow_core.messages import excerpt

OPTION_KEY = "mixofshow_concepts"


class ConceptCollisionError(ValueError):
    """Two concepts claim the same word."""


class ConceptEmbeddingError(ValueError):
    """A concept word or embedding that cannot be used; the message names the file it came from."""


def check_embedding(source, word, embedding, family=SD15):
    """Every concept entering a CLIP: a <word> with a finite [layers, context width] floating-point
    table ([16, 768] on SD1.5, [70, 2048] on SDXL)."""
    expected = [family.num_cross_attn_layers, family.context_dim]
    if not isinstance(word, str) or not CONCEPT_WORD.match(word):
        raise ConceptEmbeddingError(f"{source}: concept word {excerpt(word)} must look like <name> "
                                    f"(letters, digits, _ - . + only, in angle brackets)")
    if not isinstance(embedding, torch.Tensor) or list(embedding.shape) != expected:
        shape = list(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise ConceptEmbeddingError(f"{source}: embedding of {word} is {shape}, expected {expected}")
    if not embedding.is_floating_point() or not bool(torch.isfinite(embedding).all()):
        raise ConceptEmbeddingError(f"{source}: embedding of {word} must hold finite floating-point numbers")


@dataclass(frozen=True)
class ConceptSet:
    embeddings: tuple = ()   # ((word, [layers, context width] tensor), ...) in load order
    sources: tuple = ()      # ((word, file name), ...)
    triggers: tuple = ()     # ((plain-text trigger phrase, file name), ...) of fused ordinary LoRAs

    def __deepcopy__(self, memo):
        return self

    @property
    def words(self):
        return [w for w, _ in self.embeddings]

    def embedding_map(self):
        return dict(self.embeddings)

    def source_of(self, word):
        return dict(self.sources).get(word)

    def with_embeddings(self, embeddings, source, family=SD15):
        """A new set that also knows `embeddings` (word -> one row per cross-attention layer of
        `family`) from file `source`."""
        for word, embedding in embeddings.items():
            check_embedding(source, word, embedding, family)
            if word in self.words:
                raise ConceptCollisionError(
                    f"{source}: word {word} is already provided by {self.source_of(word)}; "
                    f"two concepts cannot share a word (rename one when fusing)")
        added = tuple((w, e.detach().to(torch.float32).clone()) for w, e in embeddings.items())
        return ConceptSet(self.embeddings + added, self.sources + tuple((w, source) for w in embeddings),
                          self.triggers)

    def with_triggers(self, phrases, source):
        """A new set that also records an ordinary LoRA's plain-text trigger phrases."""
        taken = {p.lower(): s for p, s in self.triggers}
        for phrase in phrases:
            if phrase.lower() in taken:
                raise ConceptCollisionError(f"{source}: trigger word {phrase!r} is already used by "
                                            f"{taken[phrase.lower()]}; two concepts cannot share a trigger word")
        return ConceptSet(self.embeddings, self.sources, self.triggers + tuple((p, source) for p in phrases))


def concepts_of(clip):
    return clip.patcher.model_options.get(OPTION_KEY, ConceptSet())


def set_concepts(clip, concepts):
    clip.patcher.model_options[OPTION_KEY] = concepts
