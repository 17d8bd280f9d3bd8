"""Gradient Fuse: many ED-LoRAs into one model (Mix-of-Show's center-node fusion).

Per fused layer W = W0 + D, with D the regularised least-squares solve of
min_W Σ_i ‖X_i Wᵀ − X_i (W0 + ΔW_i)ᵀ‖² from Gram sums (mixofshow_core.fusion_solver). The
stages run text encoder → cross-attention k/v → the other UNet layers, each capturing with the
earlier fused weights (fusion_capture). Baselines: weight averaging, Custom Diffusion's
constrained k/v merge, an orthogonal (ZipLoRA-style) merge.

Every result is a ("diff", …) patch on clones. The input weights may already hold a previous
fusion (its statistics given): they are W0 + D_old, so each patch is D − D_old.
"""
import torch

from ..mixofshow_core.edlora_format import EDLoRA, LoRALayer
from ..mixofshow_core.fusion_solver import GramAccumulator, LayerStats, ReusedEigh, solve, solve_like_lbfgs
from ..mixofshow_core.fusion_stats import FusionStats
from ..mixofshow_core.merge_baselines import (custom_diffusion_merge, orthogonal_merge, regularization_captions,
                                              weight_average)
from ..mixofshow_core import sd15
from .concepts import concepts_of, set_concepts
from .edlora_concept import Concept
from .fusion_capture import (KV_POSITIONS, TEXT_PREFIX, capture_spatial, capture_text_encoder, kv_inputs,
                             valid_length)
from .layerwise import install_routing
from .lora_concept import UNET_PREFIX, low_rank_factors, stand_in
from .model_keys import ModelMismatchError, clip_weight_keys, require_sd15, unet_weight_keys, weight_shapes
from .progress import Progress

METHODS = ("gradient", "weight_average", "custom_diffusion", "orthogonal")
TEXT, UNET = "text_encoder", "unet"
AVERAGED_PREFIX = {TEXT: TEXT_PREFIX, UNET: UNET_PREFIX}
REGULARIZATION_CAPTIONS = 200
LAMBDA_RULES = ("tolerance", "match_lbfgs")
DEFAULT_LAMBDA_RULE = "match_lbfgs"
# a graph saved before lambda_rule existed has no value for it and ran the tolerance rule
LAMBDA_RULE_WHEN_ABSENT = "tolerance"
# the original's L-BFGS iterations per layer: text encoder and cross-attention k/v 500, other UNet layers 50
ORIGINAL_ITERATIONS = {"text": 500, "kv": 500, "spatial": 50}


def fused_layers(concepts, previous=None):
    """{part: paths}: the union of every concept's LoRA layers and the layers an earlier fusion
    solved (`previous` statistics), k/v separate from the rest."""
    earlier = [name.split(":", 1) for name in (previous.layers if previous is not None else {})]
    text = sorted({p for c in concepts for p in c.edlora.text_encoder} | {p for part, p in earlier if part == TEXT})
    unet = {p for c in concepts for p in c.edlora.unet} | {p for part, p in earlier if part == UNET}
    kv = sorted(p for p in unet if p.endswith((".attn2.to_k", ".attn2.to_v")))
    return {"text": text, "kv": kv, "spatial": sorted(unet - set(kv))}


def layer_stage(name):
    if name.startswith(f"{TEXT}:"):
        return "text"
    return "kv" if name.endswith((".attn2.to_k", ".attn2.to_v")) else "spatial"


def solve_layer(name, stats, tolerance, kv_positions, eigh=torch.linalg.eigh):
    """D of one layer. tolerance None: the frontier point at the objective the original's L-BFGS
    reaches on this layer (same fit, less change); a float: keep (1 − tolerance) of the reducible
    objective. With the original's k/v rows (6 well-separated rows per concept) k/v layers are
    fitted exactly with the minimum change, the solution L-BFGS from W0 converges to there."""
    stage = layer_stage(name)
    if kv_positions == "concept_and_eos" and stage == "kv":
        return solve(stats, 0.0, eigh=eigh)[0]
    if tolerance is None:
        return solve_like_lbfgs(stats, ORIGINAL_ITERATIONS[stage], eigh=eigh)[0]
    return solve(stats, tolerance, eigh=eigh)[0]


def alpha_of(concept, part):
    return concept.unet_alpha if part == UNET else concept.text_encoder_alpha


def concept_delta(concept, part, path, shape):
    """α·ΔW_i of one layer as [out, in], zeros where the concept has no LoRA."""
    layer = getattr(concept.edlora, part).get(path)
    if layer is None:
        return torch.zeros(shape[0], shape[1])
    return layer.delta(alpha_of(concept, part)).reshape(shape[0], -1)


def concept_stats(concept, part, path, gram):
    """LayerStats of concept i; a concept without LoRA here still pins the layer to W0 on its rows."""
    layer = getattr(concept.edlora, part).get(path)
    if layer is None:
        return None
    if not isinstance(layer, LoRALayer):  # an ordinary LoRA's layer: its materialised ΔW
        return LayerStats.from_concept(gram, layer.delta(alpha_of(concept, part)).reshape(layer.weight_shape[0], -1))
    return LayerStats.from_lora(gram, layer.up, layer.down, alpha_of(concept, part) * layer.scale)


class Fusion:
    """Weights, key maps and changes of one fusion run."""

    def __init__(self, model, clip, concepts, method, previous=None, tolerance=1e-3, seed=0, progress=None,
                 kv_positions="all"):
        require_sd15(model, clip, what="Gradient Fuse")
        self.model, self.clip, self.concepts, self.method = model, clip, concepts, method
        self.previous, self.tolerance, self.seed, self.progress = previous, tolerance, seed, progress
        self.kv_positions = previous.kv_positions if previous is not None else kv_positions
        self.layers = fused_layers(concepts, previous)
        self.keys = {TEXT: clip_weight_keys(clip), UNET: unet_weight_keys(model)}
        self.keys[TEXT].update({p: f"{TEXT_PREFIX}{p}.weight" for p in self.layers["text"]})
        self.shapes = {TEXT: weight_shapes(clip.patcher), UNET: weight_shapes(model)}
        self.old = {}
        if previous is not None:
            self.old = {name: solve_layer(name, stats, previous.tolerance, previous.kv_positions)
                        for name, stats in previous.layers.items()}
        self.stats = {}
        self._check_layers()

    def _check_layers(self):
        for part, paths in ((TEXT, self.layers["text"]), (UNET, self.layers["kv"] + self.layers["spatial"])):
            for path in paths:
                key = self.keys[part].get(path)
                if key not in self.shapes[part]:
                    raise ModelMismatchError(f"concepts: {part} layer {path} does not exist in this model")
                for concept in self.concepts:
                    layer = getattr(concept.edlora, part).get(path)
                    if layer is not None and tuple(layer.weight_shape[:2]) != self.shapes[part][key][:2]:
                        raise ModelMismatchError(
                            f"{concept.edlora.name}: {part} layer {path} is {list(layer.weight_shape)} in the file but "
                            f"{list(self.shapes[part][key])} in the model; the ED-LoRA was made for another base model")

    def shape(self, part, path):
        return self.shapes[part][self.keys[part][path]]

    def patches(self, part, changes):
        """("diff", D − D_old) patches for {path: D}; D_old is what the input weights already hold."""
        out = {}
        for path, change in changes.items():
            shape = self.shape(part, path)
            old = self.old.get(f"{part}:{path}")
            diff = change.reshape(shape).float() - (old.reshape(shape).float() if old is not None else 0.0)
            out[self.keys[part][path]] = ("diff", (diff,))
        return out

    def patched(self, patcher, part, changes):
        clone = patcher.clone()
        clone.add_patches(self.patches(part, changes), 1.0)
        return clone

    def with_concept(self, patcher, concept, part, paths):
        """A clone whose layers `paths` are W0 + α·ΔW_i of this concept (and, for an ordinary
        LoRA, its weight-averaged layers too: it captures with its whole LoRA)."""
        changes = {p: concept_delta(concept, part, p, self.shape(part, p)) for p in paths}
        clone = self.patched(patcher, part, changes)
        clone.add_patches({k: ("diff", (layer.delta(),)) for k, layer in concept.averaged.items()
                           if k.startswith(AVERAGED_PREFIX[part])}, 1.0)
        return clone

    def with_averaged(self, patcher, part):
        """A clone with Σ_i ΔW_i / N on the layers ordinary LoRAs carry outside the fused set
        (3x3 convolutions, norms, biases). N counts earlier fused concepts too."""
        count = len(self.concepts) + (len(self.previous.concepts) if self.previous is not None else 0)
        sums = {}
        for concept in self.concepts:
            for key, layer in concept.averaged.items():
                if key.startswith(AVERAGED_PREFIX[part]):
                    sums[key] = sums.get(key, 0.0) + layer.delta()
        clone = patcher.clone()
        clone.add_patches({k: ("diff", (total / count,)) for k, total in sums.items()}, 1.0)
        return clone

    def stage(self, part, paths, add_previous=True):
        return Stage(self, part, paths, add_previous)

    def layer_stats(self, concept, part, path, gram):
        stats = concept_stats(concept, part, path, gram)
        if stats is None:
            stats = LayerStats.from_concept(gram, torch.zeros(self.shape(part, path)[0], gram.d_in))
        return stats

    def orthogonal(self, part, path, captured):
        shape = self.shape(part, path)
        pairs = [(concept_delta(c, part, path, shape), grams[path].gram) for c, grams in captured
                 if getattr(c.edlora, part).get(path) is not None]
        if not pairs:
            return torch.zeros(shape[0], shape[1])
        # the merge learns its coefficients with autograd; ComfyUI runs nodes in inference mode,
        # whose tensors cannot be saved for backward, hence the copies made outside it
        with torch.inference_mode(False), torch.enable_grad():
            deltas = [d.double().clone() for d, _ in pairs]
            grams = [g.clone() for _, g in pairs]
            return orthogonal_merge(deltas, grams, seed=self.seed)[0].detach().float()

    def stored_concepts(self, clip):
        """Stand-ins for the previously fused concepts carrying only their k/v LoRA (α folded in)."""
        if self.previous is None:
            return []
        embeddings = concepts_of(clip).embedding_map()
        stand_ins = []
        for index, record in enumerate(self.previous.concepts):
            unet = {path: LoRALayer(down, up) for path, (up, down) in self.previous.kv_loras.get(index, {}).items()}
            edlora = EDLoRA({w: embeddings[w] for w in record["words"]}, unet, {}, record["name"])
            stand_ins.append(stand_in(edlora, record) if record.get("triggers") else Concept(edlora, 1.0, 1.0))
        return stand_ins

    def kv_loras(self):
        """Every fused concept's k/v LoRA factors (α folded into up) for the saved statistics."""
        loras = dict(self.previous.kv_loras) if self.previous is not None else {}
        offset = len(self.previous.concepts) if self.previous is not None else 0
        for index, concept in enumerate(self.concepts):
            loras[offset + index] = {path: kv_factors(concept, layer) for path, layer in concept.edlora.unet.items()
                                     if path in self.layers["kv"]}
        return loras


def kv_factors(concept, layer):
    """(up, down) with ΔW = up @ down (α folded into up); an ordinary LoRA's ΔW is factored exactly
    to its numerical rank."""
    if not isinstance(layer, LoRALayer):
        return low_rank_factors(layer.delta(concept.unet_alpha))
    return (layer.up.reshape(layer.up.shape[0], -1) * (concept.unet_alpha * layer.scale),
            layer.down.reshape(layer.down.shape[0], -1))


class Stage:
    """One stage's statistics. The gradient method folds each concept's Grams into the per-layer
    sums as soon as they are captured, so memory stays flat in the number of concepts; the
    orthogonal merge needs every concept's Gram and keeps them."""

    def __init__(self, fusion, part, paths, add_previous):
        self.fusion, self.part, self.paths = fusion, part, paths
        previous = fusion.previous.layers if add_previous and fusion.previous is not None else {}
        self.totals = {p: previous.get(f"{part}:{p}") for p in paths}
        self.owned = set()  # totals this stage allocated, safe to update in place
        self.captured = []

    def add(self, concept, grams):
        if self.fusion.method == "orthogonal":
            self.captured.append((concept, grams))
            return
        for path in self.paths:
            stats = self.fusion.layer_stats(concept, self.part, path, grams[path])
            total = self.totals[path]
            if total is None:
                self.totals[path] = stats
            elif path in self.owned:
                total.add_(stats)
            else:  # saved statistics are never changed
                self.totals[path] = total + stats
            self.owned.add(path)

    def solve(self, label):
        """D for every path: the regularised least-squares solve, or the orthogonal merge. Layers
        reading the same input are solved one after another, so they share one eigh."""
        fusion, changes, eigh = self.fusion, {}, ReusedEigh()
        paths = sorted(self.paths, key=lambda p: (sd15.input_group(p), p))
        for number, path in enumerate(paths, 1):
            fusion.progress.at(f"{label}: solving layer {number}/{len(paths)}")
            name = f"{self.part}:{path}"
            if fusion.method == "orthogonal":
                changes[path] = fusion.orthogonal(self.part, path, self.captured)
            else:
                fusion.stats[name] = self.totals[path]
                changes[path] = solve_layer(name, self.totals[path], fusion.tolerance, fusion.kv_positions, eigh)
            fusion.progress.step()
        return changes


def register_concepts(clip, concepts):
    registry = concepts_of(clip)
    for concept in concepts:
        registry = registry.with_embeddings(concept.edlora.embeddings, concept.edlora.name)
        registry = registry.with_triggers(concept.triggers, concept.edlora.name)
    set_concepts(clip, registry)
    return clip


def concept_clip(clip, concept):
    """CLIP that knows only this concept's words (the text each client's encoder sees)."""
    clone = clip.clone()
    set_concepts(clone, type(concepts_of(clip))())
    return register_concepts(clone, [concept])


class KVGrams:
    """Stage B Grams of the k/v paths from per-layer rows, each formed when asked for (one
    768² Gram at a time instead of all 32); k and v of a layer read the same rows and get one."""

    def __init__(self, rows_by_layer):
        self.rows_by_layer = rows_by_layer
        self.layer, self.gram = None, None

    def __getitem__(self, path):
        layer = sd15.cross_attention_index(path)
        if layer != self.layer:
            self.layer, self.gram = layer, GramAccumulator(sd15.TEXT_DIM)
            self.gram.add(self.rows_by_layer[layer])
        return self.gram


def concept_label(stage, number, count, concept):
    return f"{stage}: concept {number}/{count} ({concept.edlora.name})"


class SamplingSteps:
    """The capture sampler's per-step callback: names the step on the node, then counts it."""

    def __init__(self, progress, label, steps):
        self.progress, self.label, self.steps, self.done = progress, label, steps, 0

    def __call__(self):
        self.done += 1
        self.progress.at(f"{self.label}, sampling step {self.done}/{self.steps}")
        self.progress.step()


def fuse_captured(fusion, steps, resolution):
    """Gradient fusion (or the orthogonal merge) stage by stage on captured inputs."""
    text_paths, kv_paths, spatial_paths = (fusion.layers[k] for k in ("text", "kv", "spatial"))
    text = fusion.stage(TEXT, text_paths)
    for number, concept in enumerate(fusion.concepts, 1):
        fusion.progress.at(concept_label("text encoder", number, len(fusion.concepts), concept))
        client = fusion.with_concept(concept_clip(fusion.clip, concept), concept, TEXT, text_paths)
        text.add(concept, capture_text_encoder(client, concept.prompt_words, text_paths))
        fusion.progress.step()
    text_changes = text.solve("text encoder")
    fused_clip = register_concepts(fusion.with_averaged(fusion.patched(fusion.clip, TEXT, text_changes), TEXT),
                                   fusion.concepts)

    # k/v needs only text-encoder passes: every concept, earlier ones included, is recaptured with
    # the new fused encoder, so adding a concept gives exactly the from-scratch k/v
    kv = fusion.stage(UNET, kv_paths, add_previous=False)
    kv_concepts = fusion.stored_concepts(fused_clip) + list(fusion.concepts)
    for number, concept in enumerate(kv_concepts, 1):
        fusion.progress.at(concept_label("cross-attention k/v", number, len(kv_concepts), concept))
        kv.add(concept, KVGrams(kv_inputs(fused_clip, concept.prompt_words, fusion.kv_positions, concept.triggers)))
        fusion.progress.step()
    kv_changes = kv.solve("cross-attention k/v")
    fused_kv = fusion.patched(fusion.model, UNET, kv_changes)

    spatial = fusion.stage(UNET, spatial_paths)
    for index, concept in enumerate(fusion.concepts):  # each concept samples its own seeded image
        label = concept_label("UNet layers", index + 1, len(fusion.concepts), concept)
        client = install_routing(fusion.with_concept(fused_kv, concept, UNET, spatial_paths))
        seed = fusion.seed + len(fusion.previous.concepts if fusion.previous else []) + index
        spatial.add(concept, capture_spatial(client, fused_clip, concept.prompt_words, spatial_paths, fusion.keys[UNET],
                                             steps, resolution, seed, SamplingSteps(fusion.progress, label, steps)))
    spatial_changes = spatial.solve("UNet layers")
    fused_model = install_routing(fusion.with_averaged(fusion.patched(fused_kv, UNET, spatial_changes), UNET))
    return fused_model, fused_clip


def averaged_changes(fusion, part, paths):
    return {p: weight_average([concept_delta(c, part, p, fusion.shape(part, p)) for c in fusion.concepts])
            for p in paths}


def fuse_weight_average(fusion):
    """FedAvg: W0 + Σ α_i ΔW_i / N on every layer."""
    fusion.progress.at("weight average: all layers")
    text = averaged_changes(fusion, TEXT, fusion.layers["text"])
    unet = averaged_changes(fusion, UNET, fusion.layers["kv"] + fusion.layers["spatial"])
    fusion.progress.step(len(text) + len(unet))
    clip = register_concepts(fusion.with_averaged(fusion.patched(fusion.clip, TEXT, text), TEXT), fusion.concepts)
    return install_routing(fusion.with_averaged(fusion.patched(fusion.model, UNET, unet), UNET)), clip


def caption_rows(clip, captions):
    """Every non-BOS token up to EOS of each caption: Custom Diffusion's regulariser features."""
    sections = [clip.tokenize(caption)["l"][0] for caption in captions]
    out = clip.encode_from_tokens({"l": sections}).reshape(len(sections), -1, sd15.TEXT_DIM)
    return torch.cat([out[i, 1:valid_length(chunk)] for i, chunk in enumerate(sections)]).float()


def fuse_custom_diffusion(fusion):
    """Custom Diffusion's constrained closed form on attn2 k/v (concept tokens map exactly to
    their fine-tuned outputs, regulariser captions stay at W0); other layers weight-averaged."""
    text = averaged_changes(fusion, TEXT, fusion.layers["text"])
    clip = register_concepts(fusion.with_averaged(fusion.patched(fusion.clip, TEXT, text), TEXT), fusion.concepts)
    regulariser = caption_rows(clip, regularization_captions(REGULARIZATION_CAPTIONS))
    rows = [kv_inputs(clip, concept.prompt_words, "concept_and_eos", concept.triggers) for concept in fusion.concepts]
    kv = {}
    for number, path in enumerate(fusion.layers["kv"], 1):
        fusion.progress.at(f"Custom Diffusion k/v merge: layer {number}/{len(fusion.layers['kv'])}")
        shape, layer = fusion.shape(UNET, path), sd15.cross_attention_index(path)
        inputs = [r[layer].double() for r in rows]
        targets = [x @ concept_delta(c, UNET, path, shape).double().T for x, c in zip(inputs, fusion.concepts)]
        # with W0 = 0 the closed form returns the change D itself (it depends only on ΔW_i c)
        kv[path] = custom_diffusion_merge(torch.zeros(shape[0], shape[1], dtype=torch.float64), inputs, targets,
                                          regulariser.double()).float()
        fusion.progress.step()
    unet = {**kv, **averaged_changes(fusion, UNET, fusion.layers["spatial"])}
    return install_routing(fusion.with_averaged(fusion.patched(fusion.model, UNET, unet), UNET)), clip


def fuse(model, clip, concepts, method="gradient", capture_steps=20, capture_resolution=512, seed=0,
         tolerance=1e-3, previous=None, kv_positions="all"):
    """(fused MODEL, fused CLIP knowing every concept's words, FusionStats or None).
    tolerance None: each layer matches the original's L-BFGS objective (solve_layer)."""
    if not concepts:
        raise ValueError("concepts: the list is empty; connect at least one 'EDLoRA Concept' or 'LoRA Concept'")
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if kv_positions not in KV_POSITIONS:
        raise ValueError(f"kv_positions: {kv_positions!r} is not one of {', '.join(KV_POSITIONS)}")
    if previous is not None and method != "gradient":
        raise ValueError(f"fusion_stats: adding concepts to saved statistics needs method 'gradient', not {method!r}")
    concepts = [concept.bind(model, clip) for concept in concepts]  # ordinary LoRAs: every layer checked
    register_concepts(clip.clone(), concepts)  # refuses words the CLIP already knows, before any work
    layer_count = sum(len(p) for p in fused_layers(concepts, previous).values())
    captured = method in ("gradient", "orthogonal")
    stored = len(previous.concepts) if previous is not None else 0
    progress = Progress(layer_count + (len(concepts) * (2 + capture_steps) + stored if captured else 0))
    fusion = Fusion(model, clip, concepts, method, previous, tolerance, seed, progress, kv_positions)
    if captured:
        fused_model, fused_clip = fuse_captured(fusion, capture_steps, capture_resolution)
    elif method == "weight_average":
        fused_model, fused_clip = fuse_weight_average(fusion)
    else:
        fused_model, fused_clip = fuse_custom_diffusion(fusion)
    if method != "gradient":
        return fused_model, fused_clip, None
    base = previous if previous is not None else FusionStats(tolerance=tolerance, kv_positions=kv_positions)
    stats = FusionStats(fusion.stats, base.concepts + [c.record() for c in concepts], tolerance, fusion.kv_positions,
                        fusion.kv_loras())
    return fused_model, fused_clip, stats


class GradientFuse:
    DESCRIPTION = ("Fuses several ED-LoRA concepts and ordinary LoRAs into one model so each keeps its identity "
                   "(Mix-of-Show gradient fusion): per layer, the weights that best reproduce every concept's own layer "
                   "outputs on its own inputs, solved in closed form from Gram matrices captured while the "
                   "model runs (memory flat in the number of concepts and steps). Baselines: weight average, "
                   "Custom Diffusion's k/v merge, orthogonal (ZipLoRA-style) merge.")
    CATEGORY = "mixofshow/fuse"
    RETURN_TYPES = ("MODEL", "CLIP", "FUSION_STATS")
    OUTPUT_TOOLTIPS = ("The fused model (use it with EDLoRA Text Encode and any sampler).",
                       "The fused CLIP, knowing every concept's words.",
                       "Per-layer sums for adding concepts later (gradient method only; save them with "
                       "'Save Fused Model').")
    FUNCTION = "fuse"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base SD1.5 model the ED-LoRAs were trained on (or a fused "
                                               "model together with its fusion_stats)."}),
                "clip": ("CLIP", {"tooltip": "The base model's CLIP."}),
                "concepts": ("EDLORA_CONCEPTS", {"tooltip": "The concepts from chained 'EDLoRA Concept' and 'LoRA "
                                                           "Concept' nodes."}),
                "method": (list(METHODS), {"default": "gradient",
                                           "tooltip": "gradient: Mix-of-Show's fusion. weight_average: ΣΔW/N. "
                                                      "custom_diffusion: constrained k/v merge. orthogonal: "
                                                      "ZipLoRA-style column mixing."}),
                "capture_steps": ("INT", {"default": 20, "min": 1, "max": 200,
                                          "tooltip": "Sampling steps recorded per concept for the UNet layers."}),
                "capture_resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                               "tooltip": "Image size of the capture sampling."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                 "tooltip": "Seed of the capture sampling; fusion is deterministic for a seed."}),
                "kv_positions": (list(KV_POSITIONS), {"default": "all",
                                 "tooltip": "Which text positions the cross-attention k/v fit sees. all: every "
                                            "position the UNet attends to (reproduces each concept far better). "
                                            "concept_and_eos: the original's choice, only the concept tokens and "
                                            "the end token (more room for very many concepts)."}),
                "fusion_tolerance": ("FLOAT", {"default": 1e-3, "min": 0.0, "max": 1.0, "step": 1e-4,
                                               "tooltip": "Only with lambda_rule 'tolerance': each layer keeps "
                                                          "(1 − tolerance) of the reducible fusion objective while "
                                                          "moving its weights as little as possible. 0 = exact least "
                                                          "squares (can move weights wildly on rank-deficient layers)."}),
            },
            "optional": {
                "lambda_rule": (list(LAMBDA_RULES), {"default": DEFAULT_LAMBDA_RULE,
                                "tooltip": "match_lbfgs (default): each layer reaches the fit the original "
                                           "Mix-of-Show L-BFGS would reach (predicted in closed form) with less "
                                           "weight change. tolerance: the fusion_tolerance rule."}),
                "fusion_stats": ("FUSION_STATS", {"tooltip": "Statistics of the fusion that produced this model "
                                                             "('Load Fused Model'): only the new concepts are captured."}),
            },
        }

    def fuse(self, model, clip, concepts, method, capture_steps, capture_resolution, seed, kv_positions,
             fusion_tolerance, fusion_stats=None, lambda_rule=LAMBDA_RULE_WHEN_ABSENT):
        if lambda_rule not in LAMBDA_RULES:
            raise ValueError(f"lambda_rule: {lambda_rule!r} is not one of {', '.join(LAMBDA_RULES)}")
        tolerance = fusion_tolerance if lambda_rule == "tolerance" else None
        return fuse(model, clip, concepts, method, capture_steps, capture_resolution, seed, tolerance,
                    fusion_stats, kv_positions)
