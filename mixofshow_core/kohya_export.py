"""An ED-LoRA as files stock tools read: a kohya LoRA and one textual-inversion embedding per word.

Kohya keys. A LoRA on module `path` of a model section is stored as
    <prefix><path with '.' -> '_'>.lora_down.weight  [r, in] (or [r, in, 1, 1])
    <prefix><path with '.' -> '_'>.lora_up.weight    [out, r]
    <prefix><path with '.' -> '_'>.alpha             alpha; loaders use ΔW = strength · alpha/r · up @ down
The prefixes and module lists are the family's data (families.py: each encoder's file section and
kohya prefix); a family's files also need its kohya base-model names below. SD1.5's kohya UNet
names are its diffusers paths; kohya's SDXL files name UNet modules by ComfyUI/ldm paths
(input_blocks_4_1_...), which SDXL support would add as a rename of the UNet section. ED-LoRA's ΔW = α · scale · up @ down has no division by rank,
so alpha = r · scale and a loader's strength plays the role of ED-LoRA's α.

Textual inversion. ED-LoRA gives each word 16 rows (row l feeds cross-attention layer l); a
plain embedding has one vector v for all layers. With E(v) the text encoder's output for the
concept's prompts with v in place of the word and E_l the output with row l, the objective is
    J(v) = mean_l mean (E(v) - E_l)^2  =  mean (E(v) - T)^2 + floor,
    T = mean_l E_l,   floor = mean_l mean (E_l - T)^2,
(the cross term vanishes because mean_l (E_l - T) = 0), so J is minimised by fitting E(v) to
the layer-mean encoding T; `floor` is what no single vector can remove. E is non-linear in v
(CLIP), so fit_single_vectors runs L-BFGS from the mean of the rows and keeps the mean when
the fit does not improve on it.
"""
import json
from dataclasses import dataclass

import torch

from .families import FAMILIES


@dataclass(frozen=True)
class KohyaSection:
    """One ED-LoRA section (`edlora.unet`, `edlora.text_encoder`, ...) and its kohya key prefix."""
    section: str
    prefix: str
    layers: tuple


def kohya_sections(family):
    """The UNet, then each text encoder under its ED-LoRA file section and kohya prefix."""
    unet = KohyaSection("unet", "lora_unet_", tuple(family.unet_lora_layers()))
    return (unet,) + tuple(KohyaSection(e.file_section, e.kohya_prefix, tuple(family.text_lora_layers(e)))
                           for e in family.encoders)


BASE_MODEL_VERSION = {"sd15": "sd_v1"}          # kohya's ss_base_model_version
MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora"}
EMBEDDING_KEY = "emb_params"                     # the A1111 safetensors embedding key ComfyUI also reads
EXPORT_VERSION = "1"


class KohyaExportError(ValueError):
    """An ED-LoRA layer that has no kohya name in its family."""


def kohya_key(prefix, path):
    return prefix + path.replace(".", "_")


def kohya_names(family="sd15"):
    """{(section, module path): kohya key} for every layer the family's ED-LoRAs may carry."""
    names = {(s.section, path): kohya_key(s.prefix, path)
             for s in kohya_sections(FAMILIES[family]) for path in s.layers}
    if len(set(names.values())) != len(names):
        raise KohyaExportError(f"{family}: two module paths give the same kohya key")
    return names


def kohya_lora_state(edlora, dtype=None, family="sd15"):
    """{kohya key: tensor} of the ED-LoRA's LoRA part; `dtype` (None: each tensor's own) for up/down,
    alpha = rank · scale as a float32 scalar."""
    names = kohya_names(family)
    state = {}
    for section in kohya_sections(FAMILIES[family]):
        for path, layer in (getattr(edlora, section.section, None) or {}).items():
            key = names.get((section.section, path))
            if key is None:
                raise KohyaExportError(f"{edlora.name}: {section.section} layer {path} has no {family} kohya name")
            state[key + ".lora_down.weight"] = layer.down.to(dtype or layer.down.dtype)
            state[key + ".lora_up.weight"] = layer.up.to(dtype or layer.up.dtype)
            state[key + ".alpha"] = torch.tensor(float(layer.rank * layer.scale), dtype=torch.float32)
    return state


def _common(values):
    """The one value all share (as kohya writes it), or kohya's 'Dynamic' when they differ."""
    values = set(values)
    return str(values.pop()) if len(values) == 1 else "Dynamic"


def kohya_metadata(edlora, output_name, source_sha256, embedding_names, family="sd15"):
    """String metadata: kohya's ss_* keys and modelspec title/architecture, plus provenance."""
    layers = edlora.lora_layers()
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _common(layer.rank for layer in layers),
        "ss_network_alpha": _common(float(layer.rank * layer.scale) for layer in layers),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": "False",
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family],
        "modelspec.title": output_name,
        "mixofshow.exported_from": edlora.name,
        "mixofshow.exported_from_sha256": source_sha256,
        "mixofshow.export_version": EXPORT_VERSION,
        "mixofshow.concept_words": json.dumps(edlora.words),
        "mixofshow.embeddings": json.dumps(embedding_names),
    }


def embedding_state(vector):
    """A textual-inversion file's tensors: one [1, D] float32 vector under emb_params."""
    return {EMBEDDING_KEY: vector.detach().reshape(1, -1).to(torch.float32).cpu()}


# ---- textual-inversion vector math ----------------------------------------------------------

def mean_rows(table):
    """[D]: the plain mean of a word's [L, D] layer rows."""
    return table.float().mean(dim=0)


def layer_objective(encoded, layer_encodings):
    """J = mean over layers l of mean((encoded - layer_encodings[:, l])^2).

    encoded [P, T, D]: the prompts encoded with single vectors; layer_encodings [P, L, T, D]."""
    return float((encoded.unsqueeze(1) - layer_encodings).double().square().mean())


def objective_floor(layer_encodings):
    """The part of J no single encoding can remove: mean_l mean((E_l - mean_l E_l)^2)."""
    return float((layer_encodings - layer_encodings.mean(dim=1, keepdim=True)).double().square().mean())


@dataclass(frozen=True)
class VectorFit:
    vectors: torch.Tensor     # [W, D], the vectors kept (fitted, or the initial ones)
    initial_objective: float  # J at the initial vectors (the mean rows)
    objective: float          # J at `vectors`
    floor: float
    fitted: bool              # False when the fit did not improve on the initial vectors
    evaluations: int          # encoder forward+backward passes the fit ran


def max_evaluations(steps):
    """Encoder evaluations L-BFGS may use for `steps` iterations (its own default ratio)."""
    return steps * 5 // 4


def fit_single_vectors(encode, layer_encodings, initial, steps, on_evaluation=None):
    """Minimises J over the [W, D] vectors (one per word) with L-BFGS (strong Wolfe line search),
    at most `steps` iterations and max_evaluations(steps) evaluations, from `initial`.

    encode(vectors [W, D]) -> [P, T, D] must be differentiable in `vectors`; the target is the
    layer mean T (J = mean((E - T)^2) + floor, module doc). The best point evaluated is kept;
    on_evaluation(count) runs after each evaluation (progress, interrupt). Needs autograd:
    call outside inference mode."""
    target = layer_encodings.mean(dim=1).detach()
    floor = objective_floor(layer_encodings)
    vectors = initial.detach().clone().float().requires_grad_(True)
    seen = []  # (fit, vectors) of every evaluation; the first is the initial point

    def closure():
        optimizer.zero_grad()
        loss = (encode(vectors) - target).square().mean()
        loss.backward()
        seen.append((float(loss.detach()), vectors.detach().clone()))
        if on_evaluation is not None:
            on_evaluation(len(seen))
        return loss

    optimizer = torch.optim.LBFGS([vectors], lr=1.0, max_iter=steps, max_eval=max_evaluations(steps),
                                  history_size=20, tolerance_grad=0.0, tolerance_change=0.0,
                                  line_search_fn="strong_wolfe")
    optimizer.step(closure)
    initial_fit = seen[0][0]
    best_fit, best = min(((fit, v) for fit, v in seen if fit == fit), key=lambda item: item[0])  # NaN never wins
    fitted = best_fit < initial_fit
    return VectorFit(best if fitted else seen[0][1], initial_fit + floor, (best_fit if fitted else initial_fit) + floor,
                     floor, fitted, len(seen))
