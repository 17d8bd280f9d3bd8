"""Ordinary (kohya/A1111) LoRA and textual-inversion files: the parts that need no host.

Trigger words are comma-separated phrases. kohya's trainer stores its captions' tag counts as
metadata `ss_tag_frequency` = JSON {dataset folder: {tag: count}}; the tags with the highest count
(those in every caption of the usual single-folder dataset) are the default trigger words.
A textual-inversion embedding is [n, D]: A1111 `.pt` ({"string_to_param": {"*": tensor}}),
`.safetensors` ("emb_params", or "clip_l" for dual-encoder files) or a diffusers `.bin` ({token: [D]}).
"""
import json
import os
import re
from collections import Counter

import torch

TAG_METADATA = "ss_tag_frequency"
MAX_DEFAULT_TAGS = 3
DORA_SUFFIX = ".dora_scale"
TI_KEYS = ("emb_params", "clip_l")


class LoRAFileError(ValueError):
    """A LoRA or embedding file that cannot be used; the message names the file and the layer kind."""


def split_triggers(text):
    """'alice, blue  hair' -> ['alice', 'blue hair']: comma- or line-separated phrases, spaces normalised."""
    phrases = (" ".join(part.split()) for part in re.split(r"[,\n]", text or ""))
    return [p for p in phrases if p]


def tag_counts(metadata):
    """Counter of kohya training tags summed over dataset folders; empty when the file has none."""
    try:
        folders = json.loads(metadata.get(TAG_METADATA) or "{}")
    except ValueError:
        return Counter()
    counts = Counter()
    for tags in folders.values() if isinstance(folders, dict) else ():
        if isinstance(tags, dict):
            counts.update({" ".join(str(t).split()): n for t, n in tags.items()
                           if isinstance(n, (int, float)) and str(t).strip()})
    return counts


def default_triggers(metadata, limit=MAX_DEFAULT_TAGS):
    """The tags with the highest count (in first-seen order), at most `limit`."""
    counts = tag_counts(metadata)
    if not counts:
        return []
    top = max(counts.values())
    return [tag for tag, n in counts.items() if n == top][:limit]


def dora_layers(keys):
    """LoRA prefixes that carry a DoRA magnitude vector."""
    return sorted(k[:-len(DORA_SUFFIX)] for k in keys if k.endswith(DORA_SUFFIX))


def embedding_vectors(data, name, width):
    """[n, width] float32 vectors of a textual-inversion file's content `data` (a dict)."""
    tensor = None
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        tensor = next(iter(data["string_to_param"].values()), None)
    elif isinstance(data, dict):
        tensor = next((data[k] for k in TI_KEYS if k in data), None)
        if tensor is None and len(data) == 1:
            tensor = next(iter(data.values()))
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise LoRAFileError(f"{name}: not a textual-inversion embedding (expected string_to_param, emb_params "
                            f"or one tensor)")
    tensor = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 0 else tensor
    if tensor.dim() != 2 or tensor.shape[1] != width or tensor.shape[0] == 0:
        raise LoRAFileError(f"{name}: embedding is {list(tensor.shape)}, expected [n, {width}] for this CLIP")
    if not bool(torch.isfinite(tensor).all()):
        raise LoRAFileError(f"{name}: embedding contains NaN or inf")
    return tensor.detach().float().clone()


def embedding_words(file_name, count):
    """Concept words of an n-vector embedding: <stem> for one vector, <stem.1> … <stem.n> otherwise."""
    stem = re.sub(r"[^\w\-.+]", "_", os.path.splitext(os.path.basename(file_name))[0]) or "embedding"
    return [f"<{stem}>"] if count == 1 else [f"<{stem}.{i}>" for i in range(1, count + 1)]
