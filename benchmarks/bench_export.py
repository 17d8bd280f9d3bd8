"""Export ED-LoRA on the tiny 16-layer model: how much of an ED-LoRA's identity a kohya LoRA plus
plain textual-inversion embeddings keep.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export.py [--quick]

Seeded random ED-LoRAs (the fusion benchmark's: embedding_scale 0.3, text LoRA scale 0.05) on the
harness's tiny SD1.5-topology model (32-channel UNet, 2-layer 768-wide CLIP), CPU, one thread.
Each is exported twice by the node (embeddings fitted through the concept's LoRA'd CLIP, and the
mean of the 16 layer rows). Then, on each prompt, timestep and seed, the cond-branch noise
prediction (one sampler evaluation at CFG 1) of:
  reference  EDLoRA Loader (α 1) + EDLoRA Text Encode: the layer-wise ED-LoRA model
  layer-wise stock 'Load LoRA' of the export (1, 1) + EDLoRA Text Encode (must equal the reference)
  fitted TI  stock 'Load LoRA' + CLIPTextEncode with embedding:<fitted vectors>
  mean TI    stock 'Load LoRA' + CLIPTextEncode with embedding:<mean rows>
  no words   stock 'Load LoRA' + the prompt without the concept words
  base       the base model, prompt without the concept words
error = ‖ε − ε_reference‖ / ‖ε_reference − ε_base‖ (what the concept changes), and
kept  = 1 − error / error(no words): the share of what the layer-wise words add that the plain
embeddings keep. Prompts: the two the fit uses ("photo of a {words}", "{words}") and two unseen ones.
--spread s scales each word's rows about their mean (row_l -> mean + s·(row_l - mean)): the seeded
rows are independent draws (s = 1), trained ED-LoRAs start from 16 equal rows and spread less.
"""
import argparse
import copy
import dataclasses
import os
import statistics
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _bootstrap  # noqa: E402

_bootstrap.add_host(cpu=True)

import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402

from comfyui_mixofshow.harness import models  # noqa: E402
from comfyui_mixofshow.harness.fusion_checks import seeded_concepts  # noqa: E402
from comfyui_mixofshow.mixofshow_core.edlora_format import save_edlora  # noqa: E402
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora  # noqa: E402
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise  # noqa: E402
from comfyui_mixofshow.nodes.export_edlora import export_edlora, fitted_vectors  # noqa: E402
from comfyui_mixofshow.nodes.paths import EDLORA_EXTENSIONS  # noqa: E402
from comfyui_mixofshow.tests.host.sampling import denoise_once  # noqa: E402

FIT_PROMPTS = ("photo of a {}", "{}")
UNSEEN_PROMPTS = ("a {} riding a bicycle in the snow", "portrait of {}, oil painting")
VARIANTS = ("layer-wise", "fitted TI", "mean TI", "no words")
KINDS = ("fit prompts", "unseen prompts")


def use_folders(root):
    """models/edlora, loras and embeddings in `root` (the only folder of each)."""
    for name in ("edlora", "loras", "embeddings"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        extensions = folder_paths.folder_names_and_paths.get(name, ([], EDLORA_EXTENSIONS))[1]
        folder_paths.folder_names_and_paths[name] = ([os.path.join(root, name)], extensions)


def reading_embeddings(clip, folder):
    """A clone whose tokenizer reads `folder`, as CheckpointLoaderSimple's CLIP reads models/embeddings."""
    reader = clip.clone()
    reader.tokenizer = copy.copy(clip.tokenizer)
    reader.tokenizer.clip_l = copy.copy(clip.tokenizer.clip_l)
    reader.tokenizer.clip_l.embedding_directory = [folder]
    return reader


def plain_encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def eps(model, cond, t, seed):
    x, denoised, sigma = denoise_once(model, cond, cond, 1.0, t=t, seed=seed)
    return (x - denoised) / sigma


def spread_rows(edlora, spread):
    """The ED-LoRA with each word's rows at `spread` times their distance from the rows' mean."""
    tables = {w: t.mean(dim=0) + spread * (t - t.mean(dim=0)) for w, t in edlora.embeddings.items()}
    return dataclasses.replace(edlora, embeddings=tables)


def concept_errors(model, clip, edlora, root, index, timesteps, seeds, fit_steps):
    """({variant: {prompt kind: [error per prompt, t, seed]}}, VectorFit) for one ED-LoRA."""
    save_edlora(edlora, os.path.join(root, "edlora", f"c{index}.safetensors"))
    for kind in ("fitted", "mean of layer rows"):
        export_edlora(f"c{index}.safetensors", f"c{index}_{kind.split()[0]}", "same as file", kind, True, clip,
                      1.0, fit_steps)
    fit = fitted_vectors(clip, edlora, 1.0, fit_steps)
    ref_model, ref_clip = apply_edlora(model, clip, edlora, 1.0, 1.0)
    stock_model, stock_clip = comfy_nodes.LoraLoader().load_lora(model, clip, f"c{index}_fitted.safetensors", 1.0, 1.0)
    reader = reading_embeddings(stock_clip, os.path.join(root, "embeddings"))
    stock_layerwise = apply_edlora(stock_model, stock_clip, edlora, 0.0, 0.0)  # routing and words, no extra LoRA
    words = " ".join(edlora.words)
    errors = {v: {k: [] for k in KINDS} for v in VARIANTS}
    for kind, templates in zip(KINDS, (FIT_PROMPTS, UNSEEN_PROMPTS)):
        for template in templates:
            def with_embeddings(method):
                return template.format(" ".join(f"embedding:c{index}_{method}_{w[1:-1]}" for w in edlora.words))
            conds = {"layer-wise": (stock_layerwise[0], encode_layerwise(stock_layerwise[1], template.format(words))),
                     "fitted TI": (stock_model, plain_encode(reader, with_embeddings("fitted"))),
                     "mean TI": (stock_model, plain_encode(reader, with_embeddings("mean"))),
                     "no words": (stock_model, plain_encode(stock_clip, template.format("").strip()))}
            reference = encode_layerwise(ref_clip, template.format(words))
            base_cond = plain_encode(clip, template.format("").strip())
            for t in timesteps:
                for seed in seeds:
                    target = eps(ref_model, reference, t, seed)
                    change = (target - eps(model, base_cond, t, seed)).norm()
                    for variant, (m, cond) in conds.items():
                        errors[variant][kind].append(float((eps(m, cond, t, seed) - target).norm() / change))
    return errors, fit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 concept, 1 timestep, 1 seed")
    parser.add_argument("--concepts", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--spread", type=float, default=1.0, help="scale of the rows about their mean")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    count, timesteps, seeds = (1, (500,), (0,)) if args.quick else (args.concepts, (200, 500, 800), (0, 1))
    with torch.inference_mode(), tempfile.TemporaryDirectory() as root:
        use_folders(root)
        model, clip = models.tiny_model(), models.tiny_clip()
        concepts = seeded_concepts(model, clip, count)
        results = [concept_errors(model, clip, spread_rows(c.edlora, args.spread), root, i, timesteps, seeds,
                                  args.fit_steps) for i, c in enumerate(concepts)]
    print(f"{count} seeded ED-LoRAs, row spread {args.spread}, timesteps {timesteps}, seeds {seeds}, "
          f"fit {args.fit_steps} L-BFGS steps\n")
    print("Text encoder: J = mean over layers of mean((E(v) - E_l)^2) on the fit prompts")
    print(f"{'concept':<9}{'J mean rows':>14}{'J fitted':>14}{'floor':>14}{'removable part removed':>25}")
    for index, (_, fit) in enumerate(results):
        share = (fit.initial_objective - fit.objective) / (fit.initial_objective - fit.floor)
        print(f"{index:<9}{fit.initial_objective:>14.4e}{fit.objective:>14.4e}{fit.floor:>14.4e}{share:>24.1%}")
    print("\nCond-branch noise prediction vs the layer-wise ED-LoRA model "
          "(error relative to the concept's change; kept = 1 - error / error(no words))")
    print(f"{'variant':<12}{'fit prompts':>14}{'kept':>8}{'unseen prompts':>17}{'kept':>8}")
    mean = {v: {k: statistics.mean(x for errors, _ in results for x in errors[v][k]) for k in KINDS} for v in VARIANTS}
    for variant in VARIANTS:
        cells = [f"{mean[variant][k]:>{width}.4f}{1 - mean[variant][k] / mean['no words'][k]:>8.1%}"
                 for k, width in zip(KINDS, (14, 17))]
        print(f"{variant:<12}{''.join(cells)}")


if __name__ == "__main__":
    main()
