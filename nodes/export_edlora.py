"""Export ED-LoRA: an ED-LoRA as a kohya LoRA in models/loras (stock LoraLoader) and one
textual-inversion embedding per concept word in models/embeddings (`embedding:<name>` in any
prompt), for tools that know neither ED-LoRA files nor layer-wise prompts.

A plain embedding gives every cross-attention layer the same vector, so the per-layer identity
of the 16 rows is only partly kept (benchmarks/bench_export.py measures how much). The vector is
fitted through the concept's own LoRA'd text encoder (mixofshow_core/kohya_export.py) on a
private fp32 copy of the CLIP, outside inference mode, as EDLoRA Train does.
"""
import os
import re

import comfy.model_management
import folder_paths
import torch

from ..mixofshow_core import sd15
from ..mixofshow_core.families import SD15
from ..mixofshow_core.edlora_format import load_edlora
from ..mixofshow_core.kohya_export import (embedding_state, fit_single_vectors, kohya_lora_state, kohya_metadata,
                                           max_evaluations, mean_rows)
from ..mixofshow_core.safe_io import file_sha256, save_safetensors
from ..mixofshow_core.training.hooks import cloned_inputs
from . import compat
from .edlora_loader import lora_patches
from .edlora_text_encode import bound_copies
from .edlora_train import encode_captions, end_position, input_rows, text_encoder_copy, text_encoder_forward
from .fusion_capture import fusion_prompts
from .model_keys import clip_weight_keys, require_sd15, weight_shapes
from .paths import EDLORA_FOLDER, WrittenFiles, check_output_name, file_fingerprint, validate_output_name
from .progress import Progress

LORA_DTYPES = {"same as file": None, "float32": torch.float32, "float16": torch.float16,
               "bfloat16": torch.bfloat16}
EMBEDDING_KINDS = ("fitted", "mean of layer rows")
NOT_IN_NAMES = re.compile(r"[^\w-]")  # characters of concept words that embedding names replace with '_'
WRITTEN = WrittenFiles()


# ---- where the files go -------------------------------------------------------------------

def embedding_stems(output_name, words):
    """{word: '<output_name>_<word without brackets>'}, the names prompts use after 'embedding:'."""
    stems = {word: output_name + "_" + NOT_IN_NAMES.sub("_", word[1:-1]) for word in words}
    if len(set(stems.values())) != len(stems):
        raise ValueError(f"concept words {', '.join(words)}: give the same embedding file name; rename one")
    return stems


def export_paths(output_name, words):
    """(LoRA path, {word: embedding path}) in the first loras and embeddings folders."""
    check_output_name(output_name, "output_name")
    if " " in output_name:
        raise ValueError(f"output_name {output_name!r}: no spaces (prompts name the embeddings as "
                         f"'embedding:{output_name.replace(' ', '_')}_<word>')")
    lora = os.path.join(folder_paths.get_folder_paths("loras")[0], f"{output_name}.safetensors")
    folder = folder_paths.get_folder_paths("embeddings")[0]
    stems = embedding_stems(output_name, words)
    return lora, {word: os.path.join(folder, f"{stem}.safetensors") for word, stem in stems.items()}


def labelled(lora_path, embedding_paths):
    """[(label, path)] of every output; labels name the folder kind: 'loras/x.safetensors'."""
    return [(f"loras/{os.path.basename(lora_path)}", lora_path)] + [
        (f"embeddings/{os.path.basename(p)}", p) for p in embedding_paths.values()]


def check_free(outputs, overwrite):
    existing = [label for label, path in outputs if os.path.exists(path)]
    if existing and not overwrite:
        raise FileExistsError(f"output_name: {', '.join(existing)} already exists; choose another output_name "
                              f"or turn on overwrite")


# ---- the embeddings ------------------------------------------------------------------------

def single_vector_encoder(clip, transformer, prompts, words):
    """encode(vectors [W, D]) -> [P, 77, D]: the prompts through `transformer` with word w's
    vector in every place the word occurs (all layers see the same encoding)."""
    embeddings = transformer.text_model.embeddings
    token_table, positions = embeddings.token_embedding.weight, embeddings.position_embedding.weight
    stand_ins = {w: torch.zeros(sd15.NUM_CROSS_ATTN_LAYERS, token_table.shape[1]) for w in words}
    rows, ends, places = [], [], []
    for index, prompt in enumerate(prompts):
        copies, order = bound_copies(clip, prompt, [0], stand_ins)
        chunk = copies[0][0]
        rows.append(input_rows(chunk, token_table))
        ends.append(end_position(chunk))
        spliced = [i for i, (t, *_) in enumerate(chunk) if not isinstance(t, int)]
        places += [(index, token, words.index(word)) for token, word in zip(spliced, order)]
    base = torch.stack(rows) + positions
    batch, token, word = (torch.tensor(column, device=base.device) for column in zip(*places))

    def encode(vectors):
        x = base.index_put((batch, token), vectors[word] + positions[token])
        return text_encoder_forward(transformer, x, SD15.encoders[0], ends)[0]
    return encode


def fitted_vectors(clip, edlora, text_encoder_alpha, steps):
    """VectorFit of one vector per word through the CLIP with the ED-LoRA's text LoRA at α."""
    require_sd15(clip=clip, what="Export ED-LoRA's embedding fit")
    if getattr(clip, "layer_idx", None) not in (None, -1):
        raise ValueError("clip: CLIP skip is set; ED-LoRA encodes with the last layer, so fit the embeddings "
                         "on a CLIP without 'CLIP Set Last Layer'")
    patched = clip.clone()
    patched.add_patches(lora_patches(edlora.text_encoder, clip_weight_keys(clip), weight_shapes(clip.patcher),
                                     edlora.name, "text_encoder"), text_encoder_alpha)
    device = comfy.model_management.get_torch_device()
    progress = Progress(max_evaluations(steps))
    progress.at(f"fitting {len(edlora.words)} embeddings")
    words, prompts = edlora.words, fusion_prompts(edlora.words)
    with torch.inference_mode(False), torch.enable_grad():
        transformer = text_encoder_copy(patched, SD15.encoders[0], device, torch.float32)
        norms = [m for m in transformer.modules() if isinstance(m, torch.nn.LayerNorm)]
        # host layers add into x in place after a norm kept x for backward: norms get copies
        with compat.training_mode(), cloned_inputs(norms):
            with torch.no_grad():
                tables = {w: t.to(device, torch.float32) for w, t in edlora.embeddings.items()}
                conditioning, _ = encode_captions(patched, SD15, [transformer], prompts, tables, words,
                                                  SD15.layer_rows("block"))
                layer_encodings = conditioning.stack
            encode = single_vector_encoder(patched, transformer, prompts, words)
            initial = torch.stack([mean_rows(edlora.embeddings[w]) for w in words]).to(device)
            return fit_single_vectors(encode, layer_encodings, initial, steps, lambda _: progress.step())


def embedding_vectors(edlora, embedding, clip, text_encoder_alpha, fit_steps):
    """({word: [D] vector}, summary line)."""
    if embedding == "mean of layer rows":
        return {w: mean_rows(t) for w, t in edlora.embeddings.items()}, "embeddings: mean of the 16 layer rows"
    if clip is None:
        raise ValueError("clip: connect the base SD1.5 CLIP to fit the embeddings, or set embedding to "
                         "'mean of layer rows'")
    fit = fitted_vectors(clip, edlora, text_encoder_alpha, fit_steps)
    kept = "fitted vectors" if fit.fitted else "mean rows (the fit did not improve on them)"
    summary = (f"embeddings: {kept}; layer-encoding error {fit.objective:.4g} (mean rows {fit.initial_objective:.4g}, "
               f"no single vector below {fit.floor:.4g})")
    return {w: v.detach().cpu() for w, v in zip(edlora.words, fit.vectors)}, summary


# ---- the node ------------------------------------------------------------------------------

def export_edlora(edlora_name, output_name, lora_dtype, embedding, overwrite, clip=None, text_encoder_alpha=1.0,
                  fit_steps=30):
    """Writes the LoRA and the embeddings; returns (summary lines, trigger text)."""
    source = folder_paths.get_full_path(EDLORA_FOLDER, edlora_name)
    if source is None:
        raise FileNotFoundError(f"edlora_name: {edlora_name} is not in models/{EDLORA_FOLDER}")
    if lora_dtype not in LORA_DTYPES:
        raise ValueError(f"lora_dtype {lora_dtype!r}: choose one of {', '.join(LORA_DTYPES)}")
    if embedding not in EMBEDDING_KINDS:
        raise ValueError(f"embedding {embedding!r}: choose one of {', '.join(EMBEDDING_KINDS)}")
    edlora = load_edlora(source)
    lora_path, embedding_paths = export_paths(output_name, edlora.words)
    outputs = labelled(lora_path, embedding_paths)
    check_free(outputs, overwrite)
    vectors, summary = embedding_vectors(edlora, embedding, clip, text_encoder_alpha, fit_steps)
    stems = {w: os.path.splitext(os.path.basename(p))[0] for w, p in embedding_paths.items()}
    metadata = kohya_metadata(edlora, output_name, file_sha256(source), stems)
    save_safetensors(kohya_lora_state(edlora, LORA_DTYPES[lora_dtype]), lora_path, metadata)
    for word, path in embedding_paths.items():
        save_safetensors(embedding_state(vectors[word]), path, {"mixofshow.exported_from": edlora.name,
                                                                "mixofshow.concept_word": word})
    for _, path in outputs:
        WRITTEN.record(path)
    return [label for label, _ in outputs] + [summary], " ".join(f"embedding:{stems[w]}" for w in edlora.words)


class ExportEDLoRA:
    DESCRIPTION = ("Writes an ED-LoRA as files any SD1.5 tool reads: its LoRA part as a kohya LoRA in "
                   "models/loras (stock 'Load LoRA' applies exactly the ED-LoRA's LoRA; its strengths are "
                   "ED-LoRA's α) and one textual-inversion embedding per concept word in models/embeddings "
                   "(write 'embedding:<name>' in a prompt). A plain embedding gives every layer the same "
                   "vector, so the layer-wise identity is only partly kept.")
    CATEGORY = "mixofshow"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("trigger",)
    OUTPUT_TOOLTIPS = ("The embeddings as prompt text, e.g. 'embedding:potter_potter1 embedding:potter_potter2'.",)
    OUTPUT_NODE = True
    FUNCTION = "export"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "edlora_name": (folder_paths.get_filename_list(EDLORA_FOLDER),
                                {"tooltip": "ED-LoRA file in models/edlora (.safetensors or original .pth)."}),
                "output_name": ("STRING", {"default": "edlora_export",
                                           "tooltip": "Writes loras/<name>.safetensors and "
                                                      "embeddings/<name>_<word>.safetensors."}),
                "lora_dtype": (list(LORA_DTYPES), {"default": "same as file",
                                                   "tooltip": "Precision of the LoRA weights."}),
                "embedding": (list(EMBEDDING_KINDS), {
                    "default": "fitted",
                    "tooltip": "fitted: the vector whose encoding is closest to the 16 layer-wise encodings "
                               "(needs clip); mean of layer rows: the plain average of the 16 rows."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace files of the same name."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The base SD1.5 CLIP the ED-LoRA was trained on (for the fit)."}),
                "text_encoder_alpha": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05,
                    "tooltip": "Text-encoder LoRA strength the embeddings are fitted for; use the same "
                               "strength_clip in 'Load LoRA'."}),
                "fit_steps": ("INT", {"default": 30, "min": 1, "max": 1000,
                                      "tooltip": "L-BFGS iterations of the fit."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None):
        return validate_output_name(output_name)

    @classmethod
    def IS_CHANGED(cls, edlora_name, output_name="", **kwargs):
        """The source file; NaN (always re-run) once the LoRA this node wrote is gone or changed."""
        try:
            lora_path, _ = export_paths(output_name, [])
        except ValueError:
            return float("nan")  # the node reports it
        if not WRITTEN.intact(lora_path):
            return float("nan")
        return file_fingerprint(folder_paths.get_full_path(EDLORA_FOLDER, edlora_name))

    def export(self, edlora_name, output_name, lora_dtype, embedding, overwrite, clip=None, text_encoder_alpha=1.0,
               fit_steps=30):
        lines, trigger = export_edlora(edlora_name, output_name, lora_dtype, embedding, overwrite, clip,
                                       text_encoder_alpha, fit_steps)
        return {"ui": {"text": lines}, "result": (trigger,)}
