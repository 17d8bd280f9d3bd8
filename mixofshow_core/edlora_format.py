"""ED-LoRA files: the original Mix-of-Show `.pth` layout and our `.safetensors` format.

Original `.pth` (notes §2.1), optionally wrapped in {'params': ...}:
    new_concept_embedding: {word: [16, 768]}        row l feeds cross-attention layer l
    text_encoder: {'<HF path>.lora_down.weight': [r, in], '<HF path>.lora_up.weight': [out, r]}
    unet:         {'<diffusers path>.lora_down.weight': ..., '.lora_up.weight': ...}
  research-branch files use '<path>_lora.down.weight' / '<path>_lora.up.weight'.
  ΔW = α · up @ down, with no division by rank.

Our `.safetensors` format uses kohya-style LoRA keys, so ComfyUI's stock LoraLoader can also
read its LoRA part:
    lora_unet_<diffusers path, '.'→'_'>.lora_down.weight / .lora_up.weight / .alpha
    lora_te_<HF path, '.'→'_'>.lora_down.weight / ...        (SD1.5's one text encoder)
    lora_te1_ / lora_te2_<HF path>...                         (SDXL: clip_l / clip_g)
    edlora_embedding.<word>: [rows, context width]  ([16, 768] on SD1.5; SDXL: clip_l ‖ clip_g
                             columns, [70, 2048] per block or [11, 2048] per spatial transformer)
  `.alpha` holds the rank, so the kohya scale alpha/rank is 1 and ΔW = α · up @ down as in
  the original. Metadata (all strings): mixofshow.format="edlora", mixofshow.format_version,
  mixofshow.concept_words (JSON list, in order), mixofshow.num_layers, mixofshow.rank,
  mixofshow.text_dim, mixofshow.base_family (families.FAMILIES: "sd15", "sdxl"), from version 2
  mixofshow.granularity ("block" / "transformer", families.py), and mixofshow.source_key_style /
  mixofshow.source_wrapped, which let a converted `.pth` be written back exactly as it was.
  When a `.pth` copy is written beside it, mixofshow.pth_sha256 holds that file's hash: a `.pth`
  whose hash is not recorded in the same-name `.safetensors` is someone else's and is never replaced.
Versions: 1 = SD1.5 at block granularity (what every SD1.5 file is, so SD1.5 files are still
written as version 1 and earlier readers keep reading them); 2 adds the family and granularity.
The original `.pth` layout exists for SD1.5 only.
"""
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field, replace

import torch

from .families import FAMILIES, GRANULARITIES, SD15
from .safe_io import (UnreadableFileError, atomic_write, file_sha256, read_safetensors, read_safetensors_metadata,
                      read_torch_weights, save_safetensors, save_torch)

FORMAT_VERSION = 2
SD15_FORMAT_VERSION = 1
BASE_FAMILY = "sd15"
EMBEDDING_PREFIX = "edlora_embedding."
UNET_KOHYA_PREFIX = "lora_unet_"
KEY_STYLES = {"main": (".lora_down.weight", ".lora_up.weight"),
              "research": ("_lora.down.weight", "_lora.up.weight")}
CONCEPT_WORD = re.compile(r"^<[\w\-.+]+>\Z")
MAX_ALPHA_SCALE = 100.0  # kohya alpha/rank; ΔW is multiplied by it
PTH_HASH_KEY = "mixofshow.pth_sha256"


class EDLoRAFormatError(ValueError):
    """A malformed or unsupported ED-LoRA file; the message names the file and the problem."""


@dataclass(frozen=True)
class LoRALayer:
    """One low-rank update: down [r, in] (or [r, in, 1, 1]), up [out, r] (or [out, r, 1, 1])."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self):
        return self.down.shape[0]

    @property
    def weight_shape(self):
        """Shape of the weight this updates: [out, in] or [out, in, 1, 1]."""
        return (self.up.shape[0], self.down.shape[1]) + tuple(self.down.shape[2:])

    def delta(self, alpha=1.0, dtype=torch.float32):
        """ΔW = α · scale · up @ down (no division by rank), shaped like the weight."""
        up = self.up.reshape(self.up.shape[0], self.rank).to(dtype)
        down = self.down.reshape(self.rank, -1).to(dtype)
        return (alpha * self.scale * (up @ down)).reshape(self.weight_shape)


def known_layers(family, part):
    """Module paths an ED-LoRA of `family` may carry in `part` ("unet" or an encoder's file section)."""
    if part == "unet":
        return frozenset(family.unet_lora_layers())
    encoder = next(e for e in family.encoders if e.file_section == part)
    return frozenset(family.text_lora_layers(encoder))


def _kohya_prefixes(family):
    return {"unet": UNET_KOHYA_PREFIX, **{e.file_section: e.kohya_prefix for e in family.encoders}}


@dataclass(frozen=True)
class EDLoRA:
    """One concept: per-layer embeddings for its words plus text-encoder and UNet LoRAs.

    embeddings rows follow `granularity` (families.py); text_encoder holds the first encoder's
    LoRAs (clip_l), text_encoder_2 the second's (SDXL's clip_g)."""
    embeddings: dict          # word -> [rows, context width], in concept order
    unet: dict                # diffusers module path -> LoRALayer
    text_encoder: dict        # HF module path (text_model.encoder...) -> LoRALayer
    name: str = "edlora"
    source: dict = field(default_factory=lambda: {"key_style": "main", "wrapped": True})
    family: str = BASE_FAMILY
    granularity: str = "block"
    text_encoder_2: dict = field(default_factory=dict)

    @property
    def base(self):
        """The families.Family this ED-LoRA was made for."""
        return FAMILIES[self.family]

    def text_parts(self):
        """{file section: {HF module path: LoRALayer}} for every text encoder of the family."""
        parts = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {e.file_section: parts[e.file_section] for e in self.base.encoders}

    def layer_embeddings(self):
        """word -> [cross-attention layers, context width]: row l feeds layer l."""
        rows = self.base.layer_rows(self.granularity)
        return {w: e[rows] for w, e in self.embeddings.items()}

    @property
    def words(self):
        return list(self.embeddings)

    @property
    def num_layers(self):
        return next(iter(self.embeddings.values())).shape[0]

    @property
    def text_dim(self):
        return next(iter(self.embeddings.values())).shape[1]

    @property
    def rank(self):
        return max((layer.rank for layer in self.lora_layers()), default=0)

    def lora_layers(self):
        return list(self.unet.values()) + [layer for part in self.text_parts().values() for layer in part.values()]

    def renamed(self, mapping):
        """A copy whose words are renamed by `mapping` (old word -> new word)."""
        return replace(self, embeddings={mapping.get(w, w): e for w, e in self.embeddings.items()})


def load_edlora(path):
    """Reads an ED-LoRA from `.safetensors` (ours) or `.pth`/`.pt` (original), validated."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise EDLoRAFormatError(f"{name}: file not found")
    try:
        if path.endswith(".safetensors"):
            edlora = _from_safetensors(*read_safetensors(path), name)
        else:
            edlora = _from_original(read_torch_weights(path), name)
    except UnreadableFileError as e:
        raise EDLoRAFormatError(str(e)) from e
    validate(edlora)
    return edlora


def save_edlora(edlora, path, extra_metadata=None):
    """Writes our `.safetensors` format atomically."""
    validate(edlora)
    tensors = {EMBEDDING_PREFIX + w: e.float() for w, e in edlora.embeddings.items()}
    prefixes = _kohya_prefixes(edlora.base)
    for part, layers in (("unet", edlora.unet), *edlora.text_parts().items()):
        for path_, layer in layers.items():
            key = prefixes[part] + path_.replace(".", "_")
            tensors[key + ".lora_down.weight"] = layer.down
            tensors[key + ".lora_up.weight"] = layer.up
            tensors[key + ".alpha"] = torch.tensor(float(layer.rank * layer.scale))
    version = SD15_FORMAT_VERSION if (edlora.family, edlora.granularity) == (BASE_FAMILY, "block") else FORMAT_VERSION
    metadata = {
        "mixofshow.format": "edlora",
        "mixofshow.format_version": str(version),
        "mixofshow.concept_words": json.dumps(edlora.words),
        "mixofshow.num_layers": str(edlora.num_layers),
        "mixofshow.rank": str(edlora.rank),
        "mixofshow.text_dim": str(edlora.text_dim),
        "mixofshow.base_family": edlora.family,
        **({"mixofshow.granularity": edlora.granularity} if version != SD15_FORMAT_VERSION else {}),
        "mixofshow.source_key_style": edlora.source.get("key_style", "main"),
        "mixofshow.source_wrapped": json.dumps(bool(edlora.source.get("wrapped", True))),
        **(extra_metadata or {}),
    }
    save_safetensors(tensors, path, metadata)


def check_pth_replaceable(path, pth_path):
    """Raises unless `pth_path` is absent or is the `.pth` copy written with the `.safetensors` at `path`."""
    if not os.path.exists(pth_path):
        return
    try:
        recorded = read_safetensors_metadata(path).get(PTH_HASH_KEY) if os.path.isfile(path) else None
    except UnreadableFileError:
        recorded = None
    if recorded is None or not os.path.isfile(pth_path) or recorded != file_sha256(pth_path):
        raise FileExistsError(f"also_save_pth: {os.path.basename(pth_path)} already exists and was not written "
                              f"together with {os.path.basename(path)}; it is left alone: move it or choose "
                              f"another output_name")


def save_edlora_with_pth(edlora, path, pth_path):
    """Writes `path` and the original `.pth` layout at `pth_path`, recording the `.pth`'s hash in `path`."""
    validate(edlora)
    check_pth_replaceable(path, pth_path)
    buffer = io.BytesIO()
    torch.save(to_original_dict(edlora), buffer)
    data = buffer.getvalue()
    save_edlora(edlora, path, {PTH_HASH_KEY: hashlib.sha256(data).hexdigest()})
    atomic_write(pth_path, lambda tmp: _write_bytes(tmp, data))


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def save_edlora_original(edlora, path):
    """Writes the original `.pth` layout (key style and wrapper as the source had them)."""
    validate(edlora)
    save_torch(to_original_dict(edlora), path)


def to_original_dict(edlora):
    if edlora.family != BASE_FAMILY:
        raise EDLoRAFormatError(f"{edlora.name}: the original .pth layout exists for SD1.5 only; "
                                f"this {edlora.family} ED-LoRA is kept as .safetensors")
    down_suffix, up_suffix = KEY_STYLES[edlora.source.get("key_style", "main")]
    params = {"new_concept_embedding": {w: e.float().clone() for w, e in edlora.embeddings.items()}}
    for part, layers in (("text_encoder", edlora.text_encoder), ("unet", edlora.unet)):
        params[part] = {}
        for path_, layer in layers.items():
            params[part][path_ + down_suffix] = layer.down.clone()
            params[part][path_ + up_suffix] = (layer.up * layer.scale).clone()  # the original has no scale
    return {"params": params} if edlora.source.get("wrapped", True) else params


def expected_embedding_shape(family, granularity):
    return (family.num_rows(granularity), family.context_dim)


def validate(edlora):
    """Structural checks that hold for any ED-LoRA of its family, independent of the target model."""
    name = edlora.name
    _check_family(name, edlora.family, edlora.granularity)
    family = edlora.base
    if not edlora.embeddings:
        raise EDLoRAFormatError(f"{name}: no concept embeddings (new_concept_embedding is empty)")
    for word, emb in edlora.embeddings.items():
        if not CONCEPT_WORD.match(word):
            raise EDLoRAFormatError(f"{name}: concept word {word!r} must look like <name> (letters, digits, _ - . + only)")
        expected = expected_embedding_shape(family, edlora.granularity)
        if tuple(emb.shape) != expected:
            widths = " ‖ ".join(f"{e.name} {e.width}" for e in family.encoders)
            raise EDLoRAFormatError(
                f"{name}: embedding of {word} is {list(emb.shape)}, expected {list(expected)} "
                f"(one {widths}-wide row per {family.name} {edlora.granularity}); not a {family.name} ED-LoRA "
                f"at {edlora.granularity} granularity")
        if not torch.isfinite(emb).all():
            raise EDLoRAFormatError(f"{name}: embedding of {word} contains NaN or inf")
    if edlora.text_encoder_2 and "text_encoder_2" not in edlora.text_parts():
        raise EDLoRAFormatError(f"{name}: {family.name} has one text encoder, but the file has text_encoder_2 LoRAs")
    for part, layers in (("unet", edlora.unet), *edlora.text_parts().items()):
        for path_, layer in layers.items():
            _validate_layer(name, family, part, path_, layer)


def _check_family(name, family, granularity):
    if family not in FAMILIES:
        raise EDLoRAFormatError(f"{name}: made for base model family {family!r}; this plugin supports "
                                f"{', '.join(FAMILIES)}")
    if granularity not in GRANULARITIES:
        raise EDLoRAFormatError(f"{name}: granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")


def _validate_layer(name, family, part, path_, layer):
    where = f"{name}: {part} layer {path_}"
    if path_ not in known_layers(family, part):
        raise EDLoRAFormatError(f"{name}: unknown {part} LoRA key {path_!r} (not an {family.name} attention, "
                                f"projection or MLP layer)")
    down, up = layer.down, layer.up
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise EDLoRAFormatError(f"{where}: lora_down {list(down.shape)} / lora_up {list(up.shape)} "
                                f"must both be 2-D (linear) or both 4-D 1x1 (conv)")
    if down.dim() == 4 and (tuple(down.shape[2:]) != (1, 1) or tuple(up.shape[2:]) != (1, 1)):
        raise EDLoRAFormatError(f"{where}: only 1x1 conv LoRAs are supported, got {list(down.shape)}")
    if down.shape[0] == 0:
        raise EDLoRAFormatError(f"{where}: rank 0 (lora_down {list(down.shape)} has no rows)")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise EDLoRAFormatError(f"{where}: lora_down/lora_up must hold floating-point numbers")
    if up.shape[1] != down.shape[0]:
        raise EDLoRAFormatError(f"{where}: rank mismatch, lora_down has {down.shape[0]} rows but "
                                f"lora_up has {up.shape[1]} columns")
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise EDLoRAFormatError(f"{where}: contains NaN or inf")


def _tensor(name, where, value):
    if not isinstance(value, torch.Tensor):
        raise EDLoRAFormatError(f"{name}: {where} holds a {type(value).__name__}, not a tensor")
    return value.detach().to("cpu")


def _from_original(obj, name):
    if not isinstance(obj, dict):
        raise EDLoRAFormatError(f"{name}: expected a dict of tensors, found {type(obj).__name__}")
    wrapped = "params" in obj
    params = obj["params"] if wrapped else obj
    if wrapped and len(obj) != 1:
        raise EDLoRAFormatError(f"{name}: unexpected top-level keys {sorted(set(obj) - {'params'})}")
    if not isinstance(params, dict):
        raise EDLoRAFormatError(f"{name}: 'params' is a {type(params).__name__}, not a dict")
    unknown = set(params) - {"new_concept_embedding", "text_encoder", "unet"}
    if unknown:
        raise EDLoRAFormatError(f"{name}: unknown sections {sorted(unknown)}; expected "
                                f"new_concept_embedding, text_encoder, unet")
    sections = {}
    for section in ("new_concept_embedding", "text_encoder", "unet"):
        value = params.get(section, {})
        if not isinstance(value, dict):
            raise EDLoRAFormatError(f"{name}: section {section} is a {type(value).__name__}, not a dict")
        sections[section] = {k: _tensor(name, f"{section}[{k!r}]", v) for k, v in value.items()}
    key_style = _key_style(name, {**sections["text_encoder"], **sections["unet"]})
    layers = {part: _pair_layers(name, part, sections[part], KEY_STYLES[key_style])
              for part in ("unet", "text_encoder")}
    return EDLoRA(sections["new_concept_embedding"], layers["unet"], layers["text_encoder"], name,
                  {"key_style": key_style, "wrapped": wrapped})


def _key_style(name, tensors):
    styles = {style for style, (down, up) in KEY_STYLES.items()
              for key in tensors if key.endswith(down) or key.endswith(up)}
    if len(styles) > 1:
        raise EDLoRAFormatError(f"{name}: mixes '.lora_down.weight' and '_lora.down.weight' keys")
    return styles.pop() if styles else "main"


def _pair_layers(name, part, tensors, suffixes):
    down_suffix, up_suffix = suffixes
    downs, ups = {}, {}
    for key, value in tensors.items():
        if key.endswith(down_suffix):
            downs[key[:-len(down_suffix)]] = value
        elif key.endswith(up_suffix):
            ups[key[:-len(up_suffix)]] = value
        else:
            raise EDLoRAFormatError(f"{name}: unknown {part} key {key!r} (expected *{down_suffix} or *{up_suffix})")
    unknown = sorted((set(downs) | set(ups)) - known_layers(SD15, part))
    if unknown:
        raise EDLoRAFormatError(f"{name}: unknown {part} LoRA key {unknown[0]!r} (not an sd15 attention, "
                                f"projection or MLP layer)")
    missing = set(downs) ^ set(ups)
    if missing:
        raise EDLoRAFormatError(f"{name}: {part} layer {sorted(missing)[0]} has only one of lora_down/lora_up")
    return {path_: LoRALayer(downs[path_], ups[path_]) for path_ in downs}


def _kohya_names(family, part):
    return {_kohya_prefixes(family)[part] + p.replace(".", "_"): p for p in known_layers(family, part)}


def _from_safetensors(tensors, metadata, name):
    if metadata.get("mixofshow.format") != "edlora":
        raise EDLoRAFormatError(f"{name}: not a Mix-of-Show ED-LoRA (no mixofshow.format=edlora metadata); "
                                f"a plain LoRA belongs in ComfyUI's LoraLoader")
    version = metadata.get("mixofshow.format_version", "?")
    if version not in (str(SD15_FORMAT_VERSION), str(FORMAT_VERSION)):
        raise EDLoRAFormatError(f"{name}: format version {version} is not supported (this plugin reads "
                                f"{SD15_FORMAT_VERSION} and {FORMAT_VERSION})")
    family_name = metadata.get("mixofshow.base_family")
    if version == str(SD15_FORMAT_VERSION) and family_name != BASE_FAMILY:
        raise EDLoRAFormatError(f"{name}: made for base model family {family_name!r}, which format version 1 "
                                f"cannot hold; version 1 files are {BASE_FAMILY}")
    granularity = metadata.get("mixofshow.granularity", "block")
    _check_family(name, family_name, granularity)
    family = FAMILIES[family_name]
    words = _metadata_words(name, metadata)
    embeddings = {}
    for word in words:
        key = EMBEDDING_PREFIX + word
        if key not in tensors:
            raise EDLoRAFormatError(f"{name}: metadata lists {word} but the file has no tensor {key}")
        embeddings[word] = tensors.pop(key)
    extra = [k for k in tensors if k.startswith(EMBEDDING_PREFIX)]
    if extra:
        raise EDLoRAFormatError(f"{name}: embedding {extra[0]} is not listed in mixofshow.concept_words")
    parts = ["unet"] + [e.file_section for e in family.encoders]
    layers = {part: _kohya_layers(name, family, part, tensors) for part in parts}
    if tensors:
        raise EDLoRAFormatError(f"{name}: unknown key {sorted(tensors)[0]!r}")
    source = {"key_style": metadata.get("mixofshow.source_key_style", "main"),
              "wrapped": metadata.get("mixofshow.source_wrapped", "true") == "true"}
    if source["key_style"] not in KEY_STYLES:
        raise EDLoRAFormatError(f"{name}: unknown mixofshow.source_key_style {source['key_style']!r}")
    return EDLoRA(embeddings, layers["unet"], layers["text_encoder"], name, source, family_name, granularity,
                  layers.get("text_encoder_2", {}))


def _metadata_words(name, metadata):
    try:
        words = json.loads(metadata.get("mixofshow.concept_words", ""))
    except json.JSONDecodeError as e:
        raise EDLoRAFormatError(f"{name}: mixofshow.concept_words is not a JSON list ({e})") from e
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise EDLoRAFormatError(f"{name}: mixofshow.concept_words must be a JSON list of words")
    return words


def _kohya_layers(name, family, part, tensors):
    """Takes this part's kohya keys out of `tensors` and pairs them into LoRALayers."""
    layers = {}
    for kohya, path_ in _kohya_names(family, part).items():
        down = tensors.pop(kohya + ".lora_down.weight", None)
        up = tensors.pop(kohya + ".lora_up.weight", None)
        alpha = tensors.pop(kohya + ".alpha", None)
        if down is None and up is None:
            continue
        if down is None or up is None:
            raise EDLoRAFormatError(f"{name}: {part} layer {path_} has only one of lora_down/lora_up")
        layers[path_] = LoRALayer(down, up, _alpha_scale(f"{name}: {part} layer {path_}", alpha, down))
    return layers


def _alpha_scale(where, alpha, down):
    """alpha / rank, the kohya scale, checked: one finite number giving 0 < scale <= MAX_ALPHA_SCALE."""
    if alpha is None:
        return 1.0
    if alpha.numel() != 1 or alpha.dim() > 1:
        raise EDLoRAFormatError(f"{where}: .alpha must be one number, got shape {list(alpha.shape)}")
    if down.dim() == 0 or down.shape[0] == 0:
        raise EDLoRAFormatError(f"{where}: rank 0 (lora_down {list(down.shape)} has no rows)")
    value = float(alpha)
    scale = value / down.shape[0]
    if not (math.isfinite(value) and 0 < scale <= MAX_ALPHA_SCALE):
        raise EDLoRAFormatError(f"{where}: .alpha {value:g} gives the scale alpha/rank = {scale:g}; it must be "
                                f"a finite number with 0 < alpha/rank <= {MAX_ALPHA_SCALE:g}")
    return scale
