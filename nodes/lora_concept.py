"""LoRA Concept: an ordinary (kohya/A1111/diffusers/LyCORIS) LoRA as a Gradient Fuse concept.

The file is read by the host's own LoRA loader (comfy.lora.load_lora with the host's key maps), so
every layer LoraLoader accepts is accepted; each layer's ΔW is materialised with the host's weight
calculation (compat.calculate_weight) when fusion needs it. Linear layers (and 1x1 convolutions)
join the gradient fusion; other layers (3x3 LoCon convolutions, norms, biases) are weight-averaged.
"""
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import comfy.lora
import comfy.utils
import folder_paths
import torch

from ..mixofshow_core import sd15
from ..mixofshow_core.edlora_format import EDLoRA
from ..mixofshow_core.lora_files import (LoRAFileError, default_triggers, dora_layers, embedding_vectors,
                                         embedding_words, split_triggers)
from ..mixofshow_core.messages import excerpt
from ..mixofshow_core.safe_io import (UnreadableFileError, read_safetensors, read_safetensors_metadata,
                                      read_torch_weights)
from .compat import calculate_weight, patch_kind
from .edlora_concept import add_concept
from .fusion_capture import TEXT_PREFIX
from .model_keys import unet_weight_keys
from .paths import UnsafePathError, file_fingerprint

LORA_FOLDER, EMBEDDING_FOLDER = "loras", "embeddings"
NO_EMBEDDING = "none"
UNET_PREFIX = "diffusion_model."


def folder_file(folder, value, input_name):
    """The file `value` names in ComfyUI folder `folder`, found as LoraLoader finds it (links the
    user placed in the folder are followed); a name that is absolute or climbs out with '..' is
    refused whether or not it exists."""
    label = f"models/{folder}"
    if os.path.isabs(value) or ".." in value.replace("\\", "/").split("/"):
        raise UnsafePathError(f"{input_name} {excerpt(value)}: must be a path inside {label} (relative, without '..')")
    path = folder_paths.get_full_path(folder, value)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{input_name}: {excerpt(value)} is not in {label}")
    return path


def read_tensor_file(path):
    """{key: tensor} of a .safetensors file, or of a pickled one loaded with weights_only=True."""
    try:
        return read_safetensors(path)[0] if path.endswith(".safetensors") else read_torch_weights(path)
    except UnreadableFileError as e:
        raise LoRAFileError(str(e)) from e


@dataclass(frozen=True)
class HostLayer:
    """One layer of an ordinary LoRA as the host loads it; ΔW computed on request."""
    key: str             # the model's state-dict key
    patch: object        # the host's patch (tuple or weight adapter)
    base: torch.Tensor   # the model's weight W0
    strength: float
    source: str          # the LoRA file's name

    @property
    def weight_shape(self):
        return tuple(self.base.shape)

    @property
    def kind(self):
        kind = patch_kind(self.patch)
        return "locon" if kind == "lora" and len(self.weight_shape) == 4 and self.weight_shape[2:] != (1, 1) else kind

    def delta(self, alpha=1.0, dtype=torch.float32):
        """ΔW = the host's patched weight minus W0, in float64 so the difference loses nothing."""
        base = self.base.detach().to("cpu", torch.float64)
        with host_errors(self):
            patched = calculate_weight([(self.strength * alpha, self.patch, 1.0, None, None)], base.clone(), self.key)
        delta = (patched.to(torch.float64) - base).to(dtype)
        if not bool(torch.isfinite(delta).all()):
            raise LoRAFileError(f"{self.source}: {self.kind} layer {self.key} gives NaN or inf")
        return delta


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def host_errors(layer):
    """The host logs (instead of raising) a layer it cannot compute and leaves the weight unchanged:
    such a log line, or an exception, becomes one LoRAFileError naming the file and the layer kind."""
    records, root = _Records(), logging.getLogger()
    root.addHandler(records)
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
        raise LoRAFileError(f"{layer.source}: {layer.kind} layer {layer.key} cannot be applied to this model "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    finally:
        root.removeHandler(records)
    if records.messages:
        raise LoRAFileError(f"{layer.source}: {layer.kind} layer {layer.key} cannot be applied to this model "
                            f"({records.messages[0]})")


def lora_prefix(key, key_map):
    """The longest key-map entry `key` starts with (followed by '.' or '_'), or None."""
    for end in range(len(key), 0, -1):
        if key[end - 1:end] in "._" and key[:end - 1] in key_map:
            return key[:end - 1]
    return None


def host_patches(state, name, model, clip):
    """{model key: host patch} of the file; every key must be read by the host's LoRA loader."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    try:
        patches = comfy.lora.load_lora(state, key_map)
    except (KeyError, IndexError, RuntimeError, ValueError, AttributeError) as e:
        raise LoRAFileError(f"{name}: malformed LoRA: a layer lacks a part the host expects ({e})") from e
    unread = [k for k in state if (prefix := lora_prefix(k, key_map)) is None or key_map[prefix] not in patches]
    if unread:
        raise LoRAFileError(f"{name}: {len(unread)} key(s) that ComfyUI's LoRA loader does not read for this "
                            f"SD1.5 model, e.g. {excerpt(unread[0])} (unknown layer kind, or a LoRA for another "
                            f"base model)")
    if not patches:
        raise LoRAFileError(f"{name}: no LoRA layer this model has")
    return patches


def module_of(model, clip, key):
    root = model.model if key.startswith(UNET_PREFIX) else clip.cond_stage_model
    if not key.endswith(".weight"):
        return None
    try:
        return comfy.utils.get_attr(root, key[:-len(".weight")])
    except AttributeError:
        return None


def is_fusable(module):
    """Linear layers and 1x1 convolutions: their outputs are linear in input rows (gradient fusion)."""
    if isinstance(module, torch.nn.Conv2d):
        return tuple(module.kernel_size) == (1, 1) and module.groups == 1
    return isinstance(module, torch.nn.Linear)


@dataclass(frozen=True)
class BoundLoRAConcept:
    """An ordinary LoRA concept resolved against one MODEL/CLIP: the fused linear layers in
    module paths (edlora.unet / edlora.text_encoder) and the weight-averaged rest by model key."""
    source: "LoRAConcept"
    edlora: EDLoRA
    averaged: dict = field(default_factory=dict)   # model key -> HostLayer
    unet_alpha: float = 1.0                         # strengths are folded into the HostLayers
    text_encoder_alpha: float = 1.0

    @property
    def words(self):
        return self.edlora.words

    @property
    def prompt_words(self):
        return self.source.prompt_words

    @property
    def triggers(self):
        return self.source.triggers

    def record(self):
        return self.source.record()

    def bind(self, model, clip):
        return self


@dataclass(frozen=True)
class LoRAConcept:
    name: str                 # the LoRA file's name
    state: dict               # its tensors
    triggers: tuple           # plain-text trigger phrases
    class_word: str
    embeddings: dict          # textual-inversion words -> [16, 768] (one vector on every layer)
    strength_model: float
    strength_clip: float
    embedding_name: str = ""

    @property
    def words(self):
        return list(self.embeddings)

    @property
    def prompt_words(self):
        """The capture prompt's words: trigger phrases, embedding words, class word."""
        return list(self.triggers) + self.words + ([self.class_word] if self.class_word else [])

    @property
    def claims(self):
        return self.words + [t.lower() for t in self.triggers]

    def record(self):
        return {"name": self.name, "words": self.words, "unet_alpha": self.strength_model,
                "text_encoder_alpha": self.strength_clip, "triggers": list(self.triggers),
                "class_word": self.class_word, "embedding": self.embedding_name}

    def bind(self, model, clip):
        """BoundLoRAConcept for this MODEL/CLIP: every layer checked once by materialising its ΔW."""
        unet_paths = {key: path for path, key in unet_weight_keys(model).items()}
        unet_state, clip_state = model.model.state_dict(), clip.cond_stage_model.state_dict()
        unet, text, averaged = {}, {}, {}
        for key, patch in host_patches(self.state, self.name, model, clip).items():
            is_unet = key.startswith(UNET_PREFIX)
            base = (unet_state if is_unet else clip_state).get(key)
            if base is None:
                raise LoRAFileError(f"{self.name}: {patch_kind(patch)} layer {key} does not exist in this model")
            layer = HostLayer(key, patch, base, self.strength_model if is_unet else self.strength_clip, self.name)
            layer.delta()
            module = module_of(model, clip, key)
            if is_fusable(module) and is_unet and key in unet_paths:
                unet[unet_paths[key]] = layer
            elif is_fusable(module) and key.startswith(TEXT_PREFIX) and len(layer.weight_shape) == 2:
                text[key[len(TEXT_PREFIX):-len(".weight")]] = layer
            else:
                averaged[key] = layer
        return BoundLoRAConcept(self, EDLoRA(self.embeddings, unet, text, self.name), averaged)


def load_embedding(embedding_name):
    """{word: [16, 768]} of a textual-inversion file in models/embeddings (nothing for 'none')."""
    if not embedding_name or embedding_name == NO_EMBEDDING:
        return {}
    path = folder_file(EMBEDDING_FOLDER, embedding_name, "embedding")
    vectors = embedding_vectors(read_tensor_file(path), embedding_name, sd15.TEXT_DIM)
    words = embedding_words(embedding_name, vectors.shape[0])
    return {w: v.expand(sd15.NUM_CROSS_ATTN_LAYERS, -1).clone() for w, v in zip(words, vectors)}


def load_lora_concept(lora_name, strength_model, strength_clip, trigger_words, class_word="", embedding_name=""):
    """LoRAConcept from files in models/loras and models/embeddings, with the file-level checks."""
    path = folder_file(LORA_FOLDER, lora_name, "lora_name")
    state = read_tensor_file(path)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoRAFileError(f"{lora_name}: not a LoRA file (expected a flat mapping of names to tensors)")
    dora = dora_layers(state)
    if dora:
        raise LoRAFileError(f"{lora_name}: DoRA layer {dora[0]} (and {len(dora) - 1} more): DoRA scales the "
                            f"base weight, so it has no fixed weight difference to fuse; use a plain LoRA")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise LoRAFileError(f"{lora_name}: tensor {bad} contains NaN or inf")
    triggers = split_triggers(trigger_words)
    if not triggers and path.endswith(".safetensors"):
        triggers = default_triggers(read_safetensors_metadata(path))
    embeddings = load_embedding(embedding_name)
    if not triggers and not embeddings:
        raise ValueError(f"trigger_words: {lora_name} has no training tags; type its trigger words")
    return LoRAConcept(lora_name, state, tuple(triggers), " ".join(class_word.split()), embeddings,
                       float(strength_model), float(strength_clip),
                       "" if embedding_name == NO_EMBEDDING else embedding_name)


class LoRAConceptNode:
    DESCRIPTION = ("Adds an ordinary LoRA (kohya/A1111, diffusers/PEFT, LoCon, LoHa, LoKr: whatever LoraLoader "
                   "reads) to the concept list for 'Gradient Fuse', with its trigger words and optionally a "
                   "textual-inversion embedding. Linear layers (attention, MLP, 1x1 projections) are fused "
                   "exactly like ED-LoRA layers; 3x3 convolutions (LoCon) and norm/bias patches are "
                   "weight-averaged. DoRA files are refused.")
    CATEGORY = "mixofshow/fuse"
    RETURN_TYPES = ("EDLORA_CONCEPTS",)
    OUTPUT_TOOLTIPS = ("The concept list, this concept last.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (folder_paths.get_filename_list(LORA_FOLDER),
                              {"tooltip": "LoRA file in models/loras."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                             "tooltip": "UNet strength, as in LoraLoader."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                            "tooltip": "Text-encoder strength, as in LoraLoader."}),
                "trigger_words": ("STRING", {"default": "", "multiline": False,
                                             "tooltip": "The words the LoRA was trained on, comma-separated (plain "
                                                        "text in prompts). Empty: the file's most frequent kohya "
                                                        "training tags (ss_tag_frequency), at most 3."}),
                "class_word": ("STRING", {"default": "", "multiline": False,
                                          "tooltip": "Optional class word for the capture prompt, e.g. 'woman' "
                                                     "('photo of a <triggers> woman')."}),
            },
            "optional": {
                "embedding": ([NO_EMBEDDING] + folder_paths.get_filename_list(EMBEDDING_FOLDER),
                              {"tooltip": "Optional textual-inversion embedding from models/embeddings (safetensors, "
                                          "or .pt/.bin read as plain tensors). It becomes the word <name> (or "
                                          "<name.1> … for several vectors) in the fused CLIP."}),
                "concepts": ("EDLORA_CONCEPTS", {"tooltip": "Concepts added by earlier nodes."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, embedding=NO_EMBEDDING, **kwargs):
        paths = [folder_paths.get_full_path(LORA_FOLDER, lora_name)]
        if embedding != NO_EMBEDDING:
            paths.append(folder_paths.get_full_path(EMBEDDING_FOLDER, embedding))
        return "|".join(str(file_fingerprint(p)) for p in paths)

    def add(self, lora_name, strength_model, strength_clip, trigger_words, class_word, embedding=NO_EMBEDDING,
            concepts=None):
        concept = load_lora_concept(lora_name, strength_model, strength_clip, trigger_words, class_word, embedding)
        return (add_concept(concepts or [], concept),)



def stand_in(edlora, record):
    """An earlier fused ordinary LoRA rebuilt from its saved record (words, triggers, class word) and
    its k/v LoRA (edlora.unet), for recapturing the k/v stage."""
    source = LoRAConcept(record["name"], {}, tuple(record.get("triggers", ())), record.get("class_word", ""),
                         edlora.embeddings, 1.0, 1.0)
    return BoundLoRAConcept(source, edlora)


def low_rank_factors(delta, rcond=1e-7):
    """(up, down) with up @ down = delta [out, in] up to rounding, of delta's numerical rank."""
    matrix = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = max(int((s > s[0] * rcond).sum()), 1) if s.numel() and s[0] > 0 else 1
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
