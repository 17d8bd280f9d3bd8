"""EDLoRA Concept: builds the list of concepts that Gradient Fuse combines."""
from dataclasses import dataclass

import folder_paths

from ..mixofshow_core.edlora_format import CONCEPT_WORD, load_edlora
from .concepts import ConceptCollisionError
from .paths import EDLORA_FOLDER, file_fingerprint


@dataclass(frozen=True)
class Concept:
    edlora: object          # EDLoRA, words already renamed
    unet_alpha: float
    text_encoder_alpha: float

    @property
    def name(self):
        return self.edlora.name

    @property
    def words(self):
        return self.edlora.words

    @property
    def prompt_words(self):
        """The words of its capture prompts."""
        return self.words

    @property
    def claims(self):
        """What no other concept in one fusion may also use."""
        return self.words

    triggers = ()    # plain-text words (ordinary LoRAs only)
    averaged = {}    # model key -> layer weight-averaged instead of fused (ordinary LoRAs only)

    def bind(self, model, clip):
        """This concept resolved against MODEL/CLIP (an ED-LoRA needs nothing more)."""
        return self

    def record(self):
        return {"name": self.edlora.name, "words": self.words, "unet_alpha": self.unet_alpha,
                "text_encoder_alpha": self.text_encoder_alpha}


def parse_rename(text, words, source):
    """'<old>=<new>, …' -> {old: new}; every old word must belong to the concept."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.replace("\n", ",").split(","))):
        old, sep, new = (s.strip() for s in item.partition("="))
        if not sep or not CONCEPT_WORD.match(old) or not CONCEPT_WORD.match(new):
            raise ValueError(f"rename: {item!r} must look like <old>=<new>")
        if old not in words:
            raise ValueError(f"rename: {source} has no word {old} (its words: {', '.join(words)})")
        mapping[old] = new
    return mapping


def add_concept(concepts, concept):
    """concepts + [concept], refusing two concepts that share a word."""
    taken = {w: c.name for c in concepts for w in c.claims}
    for word in concept.claims:
        if word in taken:
            fix = (f"rename it (rename input, e.g. '{word}=<other1>')" if word.startswith("<")
                   else "two concepts cannot share a trigger word: each one selects its concept in prompts")
            raise ConceptCollisionError(f"{concept.name}: word {word} is already used by {taken[word]}; {fix}")
    if len(set(concept.claims)) != len(concept.claims):
        raise ConceptCollisionError(f"{concept.name}: two of its words are the same")
    return list(concepts) + [concept]


class EDLoRAConcept:
    DESCRIPTION = ("Adds one ED-LoRA to a list of concepts for 'Gradient Fuse'. Chain one node per "
                   "concept. Two concepts may not share a word: rename one here.")
    CATEGORY = "mixofshow/fuse"
    RETURN_TYPES = ("EDLORA_CONCEPTS",)
    OUTPUT_TOOLTIPS = ("The concept list, this concept last.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "edlora_name": (folder_paths.get_filename_list(EDLORA_FOLDER),
                                {"tooltip": "ED-LoRA file in models/edlora (.safetensors or original .pth)."}),
                "unet_alpha": ("FLOAT", {"default": 1.0, "min": -5.0, "max": 5.0, "step": 0.05,
                                         "tooltip": "Scale of this concept's UNet LoRA (the original's fusion configs use 1.0)."}),
                "text_encoder_alpha": ("FLOAT", {"default": 1.0, "min": -5.0, "max": 5.0, "step": 0.05,
                                                 "tooltip": "Scale of this concept's text-encoder LoRA."}),
                "rename": ("STRING", {"default": "", "multiline": False,
                                      "tooltip": "Optional renaming of this concept's words, e.g. "
                                                 "'<cat1>=<tom1>, <cat2>=<tom2>'."}),
            },
            "optional": {
                "concepts": ("EDLORA_CONCEPTS", {"tooltip": "Concepts added by earlier nodes."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, edlora_name, **kwargs):
        return file_fingerprint(folder_paths.get_full_path(EDLORA_FOLDER, edlora_name))

    def add(self, edlora_name, unet_alpha, text_encoder_alpha, rename, concepts=None):
        path = folder_paths.get_full_path(EDLORA_FOLDER, edlora_name)
        if path is None:
            raise FileNotFoundError(f"edlora_name: {edlora_name} is not in models/{EDLORA_FOLDER}")
        edlora = load_edlora(path)
        edlora = edlora.renamed(parse_rename(rename, edlora.words, edlora.name))
        return (add_concept(concepts or [], Concept(edlora, unet_alpha, text_encoder_alpha)),)
