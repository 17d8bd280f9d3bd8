"""The concept words a CLIP knows, carried in its patcher's model_options.

model_options survives CLIP.clone() (stock LoRA loaders clone the CLIP), so concepts stay
attached through any chain of nodes. ConceptSet is immutable and shared between clones.
"""
from dataclasses import dataclass

import torch

OPTION_KEY = "mixofshow_concepts"


class ConceptCollisionError(ValueError):
    """Two concepts claim the same word."""


@dataclass(frozen=True)
class ConceptSet:
    embeddings: tuple = ()   # ((word, [16, 768] tensor), ...) in load order
    sources: tuple = ()      # ((word, file name), ...)

    def __deepcopy__(self, memo):
        return self

    @property
    def words(self):
        return [w for w, _ in self.embeddings]

    def embedding_map(self):
        return dict(self.embeddings)

    def source_of(self, word):
        return dict(self.sources).get(word)

    def with_embeddings(self, embeddings, source):
        """A new set that also knows `embeddings` (word -> tensor) from file `source`."""
        for word in embeddings:
            if word in self.words:
                raise ConceptCollisionError(
                    f"{source}: word {word} is already provided by {self.source_of(word)}; "
                    f"two concepts cannot share a word (rename one when fusing)")
        added = tuple((w, e.detach().to(torch.float32).clone()) for w, e in embeddings.items())
        return ConceptSet(self.embeddings + added, self.sources + tuple((w, source) for w in embeddings))


def concepts_of(clip):
    return clip.patcher.model_options.get(OPTION_KEY, ConceptSet())


def set_concepts(clip, concepts):
    clip.patcher.model_options[OPTION_KEY] = concepts
