"""Save Fused Model / Load Fused Model: a fused model as one checkpoint that stock loaders read.

The checkpoint is an ordinary SD1.5 single file (CheckpointLoaderSimple loads its weights) plus
the concepts' layer-wise embeddings as extra tensors `mixofshow.embedding.<word>` [16, 768] and
their order in the metadata `mixofshow.concepts`. Fusion statistics go beside it as
<name>.fusionstats (safetensors content; the extension keeps it out of checkpoint lists), bound to
the checkpoint by its SHA-256: saving a checkpoint rewrites or removes its sidecar, and a sidecar
whose hash is not the checkpoint's is refused.
"""
import json
import os

import comfy.sd
import comfy.utils
import folder_paths
import torch
from safetensors import SafetensorError, safe_open

from ..mixofshow_core.fusion_stats import FusionStatsError, load_fusion_stats, save_fusion_stats
from ..mixofshow_core.safe_io import atomic_write, check_finite, file_sha256
from .compat import checkpoint_state
from .concepts import check_embedding, concepts_of, set_concepts
from .layerwise import install_routing
from .paths import check_output_name, file_fingerprint

EMBEDDING_PREFIX = "mixofshow.embedding."
TRIGGERS_KEY = "mixofshow.triggers"  # plain-text trigger words of fused ordinary LoRAs (absent in older files)
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_DTYPE = "default"
CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def input_dtype(model):
    """The dtype the input checkpoint stored the UNet in: the narrowest of fp16, bf16 and fp32
    that holds every unpatched UNet weight exactly (hosts widen fp16 files to fp32 on the CPU)."""
    weights = [w for k, w in model.model.diffusion_model.state_dict().items()
               if "diffusion_model." + k not in model.patches and w.dtype in CASTABLE]
    for dtype in (torch.float16, torch.bfloat16):
        if all(torch.equal(w.to(dtype).to(w.dtype), w) for w in weights):
            return dtype
    return torch.float32


def save_dtype(model, dtype):
    if dtype == DEFAULT_DTYPE:
        return input_dtype(model)
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join((DEFAULT_DTYPE,) + tuple(SAVE_DTYPES))}")
    return SAVE_DTYPES[dtype]


def save_fused_checkpoint(path, model, clip, vae=None, stats=None, dtype=DEFAULT_DTYPE):
    """Writes the checkpoint (floating weights in `dtype`; the embeddings stay fp32) and the
    statistics sidecar atomically; returns the paths."""
    target = save_dtype(model, dtype)
    concepts = concepts_of(clip)
    state = {k: v.to(target) if v.dtype in CASTABLE else v for k, v in checkpoint_state(model, clip, vae).items()}
    state.update({EMBEDDING_PREFIX + w: e.float().contiguous() for w, e in concepts.embeddings})
    metadata = {"mixofshow.concepts": json.dumps([{"word": w, "source": concepts.source_of(w)} for w in concepts.words]),
                TRIGGERS_KEY: json.dumps([{"trigger": p, "source": source} for p, source in concepts.triggers])}
    check_finite(state, path)
    stats_path = stats_path_for(path)
    if os.path.isfile(stats_path):
        os.remove(stats_path)  # it described the checkpoint this save replaces
    atomic_write(path, lambda tmp: comfy.utils.save_torch_file(state, tmp, metadata=metadata))
    written = [path]
    if stats is not None:
        save_fusion_stats(stats, stats_path, file_sha256(path))
        written.append(stats_path)
    return written


def stats_path_for(checkpoint_path):
    return os.path.splitext(checkpoint_path)[0] + ".fusionstats"


class FusedCheckpointError(ValueError):
    """A checkpoint Load Fused Model cannot read; the message names the file."""


def read_concepts(path):
    """[(word, [16, 768], source), …] in saved order from a fused checkpoint, every one checked."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            entries = _concept_entries(name, f.metadata() or {})
            keys = set(f.keys())
            missing = [word for word, _ in entries if EMBEDDING_PREFIX + word not in keys]
            if missing:
                raise FusedCheckpointError(f"{name}: metadata names {missing[0]} but the file has no embedding for it")
            concepts = [(word, f.get_tensor(EMBEDDING_PREFIX + word), source) for word, source in entries]
    except (SafetensorError, OSError) as e:
        raise FusedCheckpointError(f"{name}: not a readable .safetensors file ({e})") from e
    for word, embedding, _ in concepts:
        check_embedding(name, word, embedding)
    return concepts


def read_triggers(path):
    """[(phrase, source)] of a fused checkpoint's ordinary-LoRA trigger words ([] for older files)."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(TRIGGERS_KEY, "[]")
        entries = json.loads(text)
    except ValueError:
        entries = None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("trigger"), str)
                                                and isinstance(e.get("source", ""), str) for e in entries):
        raise FusedCheckpointError(f"{name}: {TRIGGERS_KEY} metadata must be a JSON list of "
                                   f'{{"trigger": "words", "source": "file"}} entries')
    return [(e["trigger"], e.get("source") or "fused") for e in entries]


def _concept_entries(name, metadata):
    """[(word, source)] of the mixofshow.concepts metadata: a JSON list of {"word", "source"}."""
    if "mixofshow.concepts" not in metadata:
        raise FusedCheckpointError(f"{name}: not a fused Mix-of-Show checkpoint (no mixofshow.concepts "
                                   f"metadata); load plain checkpoints with CheckpointLoaderSimple")
    try:
        entries = json.loads(metadata["mixofshow.concepts"])
    except ValueError:
        entries = None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("word"), str)
                                                and isinstance(e.get("source", ""), (str, type(None)))
                                                for e in entries):
        raise FusedCheckpointError(f"{name}: mixofshow.concepts metadata must be a JSON list of "
                                   f'{{"word": "<name>", "source": "file"}} entries')
    words = [e["word"] for e in entries]
    if len(set(words)) != len(words):
        raise FusedCheckpointError(f"{name}: mixofshow.concepts lists a word twice")
    return [(e["word"], e.get("source") or "fused") for e in entries]


def load_fused_checkpoint(path):
    """(MODEL with layer-wise routing, CLIP knowing the fused words, VAE, FusionStats or None)."""
    concepts = read_concepts(path)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    registry = concepts_of(clip)
    for word, embedding, source in concepts:
        registry = registry.with_embeddings({word: embedding}, source)
    for phrase, source in read_triggers(path):
        registry = registry.with_triggers([phrase], source)
    set_concepts(clip, registry)
    stats = None
    stats_path = stats_path_for(path)
    if os.path.isfile(stats_path):
        stats = load_fusion_stats(stats_path, file_sha256(path))
        if stats.words != [w for w, _, _ in concepts]:
            raise FusionStatsError(f"fusion stats {os.path.basename(stats_path)}: its concepts {stats.words} are not "
                                   f"the checkpoint's {[w for w, _, _ in concepts]}; it belongs to another fusion")
    return install_routing(model.clone()), clip, vae, stats


class SaveFusedModel:
    DESCRIPTION = ("Saves a fused model as one .safetensors checkpoint in models/checkpoints (loadable by "
                   "CheckpointLoaderSimple; 'Load Fused Model' also restores the concept words), and its fusion "
                   "statistics beside it (.fusionstats) so more concepts can be added later.")
    CATEGORY = "mixofshow/fuse"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The fused model from 'Gradient Fuse'."}),
                "clip": ("CLIP", {"tooltip": "The fused CLIP (its concept words are saved with it)."}),
                "vae": ("VAE", {"tooltip": "The VAE to store in the checkpoint."}),
                "filename_prefix": ("STRING", {"default": "mixofshow_fused",
                                               "tooltip": "Name of the checkpoint; a counter keeps older files."}),
            },
            "optional": {
                "fusion_stats": ("FUSION_STATS", {"tooltip": "Statistics from 'Gradient Fuse' (gradient method)."}),
                "dtype": ([DEFAULT_DTYPE] + list(SAVE_DTYPES), {
                    "default": DEFAULT_DTYPE,
                    "tooltip": "Precision of the saved weights; 'default' keeps the input checkpoint's "
                               "(fp16 for the usual SD1.5 files)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        try:
            if filename_prefix is not None:  # None: linked, checked when the node runs
                check_output_name(filename_prefix, "filename_prefix", subfolders=True)
        except ValueError as e:
            return str(e)
        return True

    def save(self, model, clip, vae, filename_prefix, fusion_stats=None, dtype=DEFAULT_DTYPE):
        check_output_name(filename_prefix, "filename_prefix", subfolders=True)
        folder = folder_paths.get_folder_paths("checkpoints")[0]
        full_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder)
        path = os.path.join(full_folder, f"{name}_{counter:05}_.safetensors")
        written = save_fused_checkpoint(path, model, clip, vae, fusion_stats, dtype)
        return {"ui": {"text": [os.path.relpath(p, folder_paths.models_dir) for p in written]}}


class LoadFusedModel:
    DESCRIPTION = ("Loads a checkpoint written by 'Save Fused Model': MODEL (with layer-wise routing), CLIP "
                   "(knowing the fused concepts' words), VAE and, when saved, the fusion statistics.")
    CATEGORY = "mixofshow/fuse"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "FUSION_STATS")
    OUTPUT_TOOLTIPS = ("The fused model.", "The fused CLIP with the concept words.", "The VAE.",
                       "Statistics to add more concepts with 'Gradient Fuse' (None when none were saved).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),
                                           {"tooltip": "A fused checkpoint in models/checkpoints."})}}

    @classmethod
    def IS_CHANGED(cls, ckpt_name):
        return file_fingerprint(folder_paths.get_full_path("checkpoints", ckpt_name))

    def load(self, ckpt_name):
        path = folder_paths.get_full_path("checkpoints", ckpt_name)
        if path is None:
            raise FileNotFoundError(f"ckpt_name: {ckpt_name} is not in models/checkpoints")
        return load_fused_checkpoint(path)
