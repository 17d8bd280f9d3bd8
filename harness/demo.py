"""End-to-end demo through a real, headless ComfyUI server: ED-LoRA txt2img, then gradient
fusion of several concepts into one saved checkpoint, then a regional image with the fused model.

    bash scripts/demo.sh                                   # random demo model: the images are noise
    bash scripts/demo.sh --checkpoint sd15.safetensors --edlora potter.pth hermione.pth [--prompt "..."]

The flow, one server, three API workflows:
  1. workflows/edlora_txt2img_api.json: one image with the ED-LoRA(s) (several are chained loaders);
  2. workflows/fuse_three_concepts_api.json: the concepts fused (Gradient Fuse), saved as one
     checkpoint + .fusionstats (Save Fused Model), and an image of two of them in one prompt;
  3. workflows/regional_two_concepts_api.json: the saved checkpoint loaded with Load Fused Model,
     two concepts in two boxes over a keypose image (Regional Sampler).
With no model given it generates (once) a seeded random SD1.5-topology checkpoint, three random
ED-LoRAs (words <cat1> <cat2>, <dog1> <dog2>, <owl1> <owl2>) and a random keypose ControlNet;
they only prove the pipeline runs. With a real SD1.5 checkpoint and real ED-LoRA file(s) they are
linked into the run's model folders and used; the prompt must contain each ED-LoRA's concept words.
Steps 2 and 3 need at least two real ED-LoRAs; step 3 uses --controlnet (a keypose ControlNet or
T2I-Adapter) when given and otherwise samples the regions without a pose. Environment variables
MIXOFSHOW_CHECKPOINT, MIXOFSHOW_EDLORA (several separated by ':'), MIXOFSHOW_PROMPT and
MIXOFSHOW_CONTROLNET stand in for the options.
"""
import argparse
import copy
import gc
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "harness":
    del sys.path[0]  # run as a script: keep harness/*.py from shadowing ComfyUI's top-level modules

WORKFLOW = ROOT / "workflows" / "edlora_txt2img_api.json"
FUSION_WORKFLOW = ROOT / "workflows" / "fuse_three_concepts_api.json"
REGIONAL_WORKFLOW = ROOT / "workflows" / "regional_two_concepts_api.json"
RUN_DIR = ROOT / ".host" / "run"
DEMO_CHECKPOINT = "mixofshow_demo_sd15.safetensors"
DEMO_EDLORA = "mixofshow_demo_cat.safetensors"
DEMO_WORDS = ("<cat1>", "<cat2>")
DEMO_SEED = 0
# the fusion demo's further concepts: (name, seed); files mixofshow_demo_<name>.safetensors
DEMO_CONCEPTS = (("dog", 20), ("owl", 22))
DEMO_CONTROLNET = "mixofshow_demo_keypose_controlnet.safetensors"
DEMO_FUSED_PREFIX = "mixofshow_fused_three"


def _bootstrap():
    """Registers the repo as the package comfyui_mixofshow (see harness/__init__.py)."""
    if "comfyui_mixofshow" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_mixofshow_bootstrap", ROOT / "harness" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.register_plugin_package()


_bootstrap()
from comfyui_mixofshow.harness import server as harness_server  # noqa: E402


# -- demo models ------------------------------------------------------------------------------
def ensure_demo_models(run_dir=RUN_DIR, log=print):
    """Generates (if missing) the random demo checkpoint and demo ED-LoRA in run_dir/models;
    returns their paths. Loads ComfyUI in this process (on the CPU) to shape the ED-LoRA."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / "models" / "checkpoints" / DEMO_CHECKPOINT
    edlora = run_dir / "models" / "edlora" / DEMO_EDLORA
    if checkpoint.is_file() and edlora.is_file():
        return checkpoint, edlora
    from comfyui_mixofshow.harness import host
    host.add_host_to_path(cpu=True)
    import torch
    from comfyui_mixofshow.harness import models
    if not checkpoint.is_file():
        log(f"Generating the random demo checkpoint {checkpoint} (about 480 MB) ...")
        start = time.perf_counter()
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_name("." + checkpoint.name + ".partial")
        with torch.inference_mode():  # building the host's CLIP needs it (harness.md §4)
            models.write_checkpoint(str(tmp), seed=DEMO_SEED)
        os.replace(tmp, checkpoint)
        edlora.unlink(missing_ok=True)  # shaped for the old file
        log(f"  done in {time.perf_counter() - start:.1f} s")
    if not edlora.is_file():
        log(f"Generating the random demo ED-LoRA {edlora} (words {' '.join(DEMO_WORDS)}) ...")
        import comfy.sd
        from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
        from comfyui_mixofshow.mixofshow_core.edlora_format import save_edlora
        with torch.inference_mode():
            model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
                str(checkpoint), output_vae=False, output_clip=True, embedding_directory=None)
            unet_shapes, text_shapes = model_lora_shapes(model, clip)
        del model, clip
        gc.collect()
        save_edlora(random_edlora(list(DEMO_WORDS), unet_shapes, text_shapes, seed=DEMO_SEED + 10,
                                  name=DEMO_EDLORA), str(edlora))
    return checkpoint, edlora


def write_demo_concept(cat_path, name, seed, folder):
    """A random ED-LoRA for <name1> <name2> on the layers (and shapes) of the demo ED-LoRA, in
    folder (if missing); returns its path."""
    from comfyui_mixofshow.harness.edlora_fixtures import random_edlora
    from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora, save_edlora
    path = Path(folder) / f"mixofshow_demo_{name}.safetensors"
    if path.is_file() and path.stat().st_mtime >= Path(cat_path).stat().st_mtime:
        return path
    cat = load_edlora(str(cat_path))
    unet_shapes = {p: layer.weight_shape for p, layer in cat.unet.items()}
    text_shapes = {p: layer.weight_shape for p, layer in cat.text_encoder.items()}
    edlora = random_edlora([f"<{name}1>", f"<{name}2>"], unet_shapes, text_shapes, seed=seed, name=path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".partial")
    save_edlora(edlora, str(tmp))
    os.replace(tmp, path)
    return path


def ensure_demo_concepts(run_dir=RUN_DIR, log=print):
    """The demo checkpoint and the three demo ED-LoRAs (cat, dog, owl): (checkpoint, [paths])."""
    checkpoint, cat = ensure_demo_models(run_dir, log)
    folder = Path(run_dir) / "models" / "edlora"
    return checkpoint, [cat] + [write_demo_concept(cat, name, seed, folder) for name, seed in DEMO_CONCEPTS]


def ensure_demo_controlnet(run_dir=RUN_DIR):
    """A seeded random keypose ControlNet shaped for the demo UNet (ComfyUI's T2I-Adapter loader
    cannot build one for the demo UNet's 320 channels at every level); returns its path."""
    path = Path(run_dir) / "models" / "controlnet" / DEMO_CONTROLNET
    if not path.is_file():
        from comfyui_mixofshow.harness import host
        host.add_host_to_path(cpu=True)
        from comfyui_mixofshow.harness import models
        tmp = path.with_name("." + path.name + ".partial")
        models.write_controlnet(str(tmp))
        os.replace(tmp, path)
    return path


def link_model(source, folder):
    """Symlinks (or, where links fail, copies) a user's model file into a run model folder;
    returns the file name ComfyUI lists it under."""
    source = Path(source).expanduser().resolve()
    if not source.is_file():
        raise SystemExit(f"no such file: {source}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    if target.is_symlink():
        if target.resolve() == source:
            return target.name
        target.unlink()
    elif target.exists():
        if os.path.samefile(target, source):
            return target.name
        raise SystemExit(f"{target} already exists and is another file; rename {source.name}")
    try:
        target.symlink_to(source)
    except OSError:
        shutil.copy2(source, target)
    return target.name


# -- workflow ---------------------------------------------------------------------------------
def load_workflow(path=WORKFLOW):
    with open(path) as f:
        return json.load(f)


def _only(prompt, class_type):
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise ValueError(f"workflow: expected one {class_type} node, found {len(ids)}")
    return ids[0]


def build_prompt(workflow, checkpoint, edloras, prompt=None, negative=None, width=None, height=None,
                 steps=None, seed=None, filename_prefix=None):
    """The API workflow with the model names and settings filled in. Several ED-LoRAs are
    applied by chaining loaders (a plain LoRA sum, fine for trying one concept at a time)."""
    graph = copy.deepcopy(workflow)
    graph[_only(graph, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = checkpoint
    loader_id = _only(graph, "MixOfShowEDLoRALoader")
    graph[loader_id]["inputs"]["edlora_name"] = edloras[0]
    last = loader_id
    for index, name in enumerate(edloras[1:], start=1):
        node_id = f"{loader_id}_{index}"
        graph[node_id] = copy.deepcopy(graph[loader_id])
        graph[node_id]["inputs"].update(model=[last, 0], clip=[last, 1], edlora_name=name)
        last = node_id
    for node_id, node in graph.items():  # everything downstream of the first loader uses the last
        if node_id == last or node["class_type"] == "MixOfShowEDLoRALoader":
            continue
        for key, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == loader_id:
                node["inputs"][key] = [last, value[1]]
    sampler = graph[_only(graph, "KSampler")]["inputs"]
    if prompt is not None:
        graph[sampler["positive"][0]]["inputs"]["text"] = prompt
    if negative is not None:
        graph[sampler["negative"][0]]["inputs"]["text"] = negative
    latent = graph[_only(graph, "EmptyLatentImage")]["inputs"]
    for key, value in (("width", width), ("height", height)):
        if value is not None:
            latent[key] = value
    for key, value in (("steps", steps), ("seed", seed)):
        if value is not None:
            sampler[key] = value
    if filename_prefix is not None:
        graph[_only(graph, "SaveImage")]["inputs"]["filename_prefix"] = filename_prefix
    return graph


def _references(graph, node_id):
    """[(node, input name)] of every input linked to node_id's outputs."""
    return [(node, key) for node in graph.values() for key, value in node["inputs"].items()
            if isinstance(value, list) and len(value) == 2 and value[0] == node_id]


def concept_chain(graph):
    """The EDLoRA Concept node ids feeding the Gradient Fuse node, first concept first."""
    chain, node_id = [], graph[_only(graph, "MixOfShowGradientFuse")]["inputs"]["concepts"][0]
    while node_id is not None:
        if graph[node_id]["class_type"] != "MixOfShowEDLoRAConcept":
            raise ValueError(f"workflow: node {node_id} feeds the concept chain but is no EDLoRA Concept")
        chain.insert(0, node_id)
        linked = graph[node_id]["inputs"].get("concepts")
        node_id = linked[0] if linked else None
    return chain


def replace_words(text, replacements):
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def build_fusion_prompt(workflow, checkpoint, edloras, prompt=None, negative=None, width=None, height=None,
                        steps=None, seed=None, capture_steps=None, capture_resolution=None, method=None,
                        filename_prefix=None, image_prefix=None):
    """The fusion API workflow with one EDLoRA Concept node per file in `edloras` (the chain is
    cut or extended as needed) and the settings filled in."""
    graph = copy.deepcopy(workflow)
    graph[_only(graph, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = checkpoint
    if not edloras:
        raise ValueError("fusion needs at least one ED-LoRA")
    chain = concept_chain(graph)
    template = graph[chain[0]]
    ids = chain[:len(edloras)] + [f"{chain[-1]}_{i}" for i in range(1, len(edloras) - len(chain) + 1)]
    for node_id in chain[len(edloras):]:
        del graph[node_id]
    for index, (node_id, name) in enumerate(zip(ids, edloras)):
        node = copy.deepcopy(graph.get(node_id, template))
        node["inputs"].update(edlora_name=name, rename="")
        node["inputs"].pop("concepts", None)
        if index:
            node["inputs"]["concepts"] = [ids[index - 1], 0]
        node.setdefault("_meta", {})["title"] = f"EDLoRA Concept ({name})"
        graph[node_id] = node
    fuse = graph[_only(graph, "MixOfShowGradientFuse")]["inputs"]
    fuse["concepts"] = [ids[-1], 0]
    for key, value in (("capture_steps", capture_steps), ("capture_resolution", capture_resolution),
                       ("method", method), ("seed", seed)):
        if value is not None:
            fuse[key] = value
    if method not in (None, "gradient"):  # only gradient fusion has statistics to save
        graph[_only(graph, "MixOfShowSaveFusedModel")]["inputs"].pop("fusion_stats", None)
    if filename_prefix is not None:
        graph[_only(graph, "MixOfShowSaveFusedModel")]["inputs"]["filename_prefix"] = filename_prefix
    sampler = graph[_only(graph, "KSampler")]["inputs"]
    if prompt is not None:
        graph[sampler["positive"][0]]["inputs"]["text"] = prompt
    if negative is not None:
        graph[sampler["negative"][0]]["inputs"]["text"] = negative
    latent = graph[_only(graph, "EmptyLatentImage")]["inputs"]
    for key, value in (("width", width), ("height", height)):
        if value is not None:
            latent[key] = value
    for key, value in (("steps", steps), ("seed", seed)):
        if value is not None:
            sampler[key] = value
    if image_prefix is not None:
        graph[_only(graph, "SaveImage")]["inputs"]["filename_prefix"] = image_prefix
    return graph


def saved_checkpoints(entry, graph):
    """The files Save Fused Model reported, relative to the server's models folder ('checkpoints/…')."""
    outputs = entry.get("outputs", {}).get(_only(graph, "MixOfShowSaveFusedModel"), {})
    return list(outputs.get("text", []))


def host_models_dir(server):
    """The models folder Save Fused Model writes under: the first checkpoints folder ComfyUI
    registers is its own models/checkpoints (the run folder's model folders are extra paths)."""
    return Path(server.host_dir) / "models"


def build_regional_prompt(workflow, fused_checkpoint, words=None, controlnet=None, pose=None, width=None,
                          height=None, steps=None, seed=None, filename_prefix=None):
    """The regional API workflow sampling with a fused checkpoint: its checkpoint and ED-LoRA
    loaders become one Load Fused Model node (same output slots: MODEL, CLIP, VAE). `words`
    maps the workflow's concept words ('<cat1> <cat2>') to others in every prompt. Without
    `controlnet` the keypose nodes are bypassed (regions without a pose)."""
    graph = copy.deepcopy(workflow)
    removed = [k for k, v in graph.items() if v["class_type"] in ("CheckpointLoaderSimple", "MixOfShowEDLoRALoader")]
    fused_id = _only(graph, "CheckpointLoaderSimple")
    for node_id in removed:
        del graph[node_id]
    for node in graph.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in removed:
                node["inputs"][key] = [fused_id, value[1]]
    graph[fused_id] = {"class_type": "MixOfShowLoadFusedModel", "inputs": {"ckpt_name": fused_checkpoint},
                       "_meta": {"title": "Load Fused Model"}}
    for node in graph.values():
        for key in ("text", "prompt"):
            if isinstance(node["inputs"].get(key), str) and words:
                node["inputs"][key] = replace_words(node["inputs"][key], words)
    if controlnet is None:
        apply_id = _only(graph, "ControlNetApplyAdvanced")
        apply = graph.pop(apply_id)
        for node, key in _references(graph, apply_id):
            node["inputs"][key] = apply["inputs"]["positive" if node["inputs"][key][1] == 0 else "negative"]
        for node_id in [k for k, v in graph.items() if v["class_type"] in ("ControlNetLoader", "LoadImage")]:
            if not _references(graph, node_id) or all(n is apply for n, _ in _references(graph, node_id)):
                del graph[node_id]
    else:
        graph[_only(graph, "ControlNetLoader")]["inputs"]["control_net_name"] = controlnet
        if pose is not None:
            graph[_only(graph, "LoadImage")]["inputs"]["image"] = pose
    latent = graph[_only(graph, "EmptyLatentImage")]["inputs"]
    for key, value in (("width", width), ("height", height)):
        if value is not None:
            latent[key] = value
    sampler = graph[_only(graph, "KSampler")]["inputs"]
    for key, value in (("steps", steps), ("seed", seed)):
        if value is not None:
            sampler[key] = value
    if filename_prefix is not None:
        graph[_only(graph, "SaveImage")]["inputs"]["filename_prefix"] = filename_prefix
    return graph


def positive_text(graph):
    sampler = graph[_only(graph, "KSampler")]["inputs"]
    return graph[sampler["positive"][0]]["inputs"]["text"]


def png_size(data):
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def concept_words(path):
    from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora
    return load_edlora(str(path)).words


# -- main -------------------------------------------------------------------------------------
def parse_args(argv):
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--checkpoint", default=env.get("MIXOFSHOW_CHECKPOINT") or None,
                        help="a real SD1.5 checkpoint (.safetensors/.ckpt) [MIXOFSHOW_CHECKPOINT]")
    parser.add_argument("--edlora", nargs="+",
                        default=[p for p in env.get("MIXOFSHOW_EDLORA", "").split(os.pathsep) if p],
                        help="real ED-LoRA file(s), .safetensors or original Mix-of-Show .pth; two or more "
                             "are also fused [MIXOFSHOW_EDLORA]")
    parser.add_argument("--prompt", default=env.get("MIXOFSHOW_PROMPT") or None,
                        help="positive prompt; must contain each ED-LoRA's concept words [MIXOFSHOW_PROMPT]")
    parser.add_argument("--negative", default=None)
    parser.add_argument("--size", type=int, default=None,
                        help="image width and height (default 64 for the demo model, 512 for a real one)")
    parser.add_argument("--steps", type=int, default=None, help="default 8 (demo model) or 25 (real)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--capture-steps", type=int, default=None,
                        help="Gradient Fuse capture steps (default 2 for the demo model, 20 for a real one)")
    parser.add_argument("--capture-resolution", type=int, default=None,
                        help="Gradient Fuse capture resolution (default 64 for the demo model, 512 for a real one)")
    parser.add_argument("--method", default="gradient",
                        choices=("gradient", "weight_average", "custom_diffusion", "orthogonal"),
                        help="fusion method (default gradient)")
    parser.add_argument("--controlnet", default=env.get("MIXOFSHOW_CONTROLNET") or None,
                        help="a keypose ControlNet/T2I-Adapter for the regional image with a real model "
                             "[MIXOFSHOW_CONTROLNET]; without it the regions are sampled without a pose")
    parser.add_argument("--no-fusion", action="store_true", help="only the ED-LoRA txt2img image (the old demo)")
    parser.add_argument("--run-dir", default=str(RUN_DIR), help="server run folder (default .host/run)")
    parser.add_argument("--out", default=str(ROOT / "out" / "mixofshow_demo.png"),
                        help="where the txt2img image fetched through /view is written; the fused and "
                             "regional images go beside it as <name>_fused.png and <name>_regional.png")
    parser.add_argument("--cpu", action="store_true",
                        help="run ComfyUI with --cpu even when CUDA is available (default: CUDA if torch sees it)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for each prompt (default 600, real 3600)")
    args = parser.parse_args(argv)
    if args.edlora and not args.checkpoint:
        parser.error("an ED-LoRA needs the SD1.5 checkpoint it was trained for: also give --checkpoint "
                     "(the random demo model has other weights, so a real ED-LoRA would not mean anything on it)")
    if args.checkpoint and not args.edlora:
        parser.error("a real checkpoint needs a real ED-LoRA: also give --edlora (the demo ED-LoRA is "
                     "shaped for the random demo model only)")
    if args.controlnet and not args.checkpoint:
        parser.error("--controlnet is for a real model; the demo model brings its own random keypose ControlNet")
    return args


def _save_png(data, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    width, height = png_size(data)
    return f"{width}x{height} PNG"


def _run_image(client, graph, timeout, what):
    """(history entry, image info, PNG bytes) of one prompt."""
    start = time.perf_counter()
    entry = client.run(graph, timeout=timeout)
    images = client.images(entry)
    if not images:
        raise SystemExit(f"{what}: the prompt finished but produced no image: {entry.get('outputs')}")
    print(f"  done in {time.perf_counter() - start:.1f} s")
    return entry, images[0][0], images[0][1]


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    workflow = load_workflow()
    real = bool(args.checkpoint)
    controlnet = None

    if real:
        checkpoint = link_model(args.checkpoint, run_dir / "models" / "checkpoints")
        edloras, words = [], []
        for path in args.edlora:
            edloras.append(link_model(path, run_dir / "models" / "edlora"))
            words.append(concept_words(path))
            print(f"ED-LoRA {edloras[-1]}: concept words {' '.join(words[-1])}")
        prompt = args.prompt or "a photo of " + " and ".join(" ".join(w) for w in words)
        size, steps, timeout = args.size or 512, args.steps or 25, args.timeout or 3600
        fuse = len(edloras) >= 2 and not args.no_fusion
        fusion_edloras = edloras
        capture = (args.capture_steps or 20, args.capture_resolution or 512)
        fused_prefix, fusion_prompt = "mixofshow_fused", prompt
        if args.controlnet:
            controlnet = link_model(args.controlnet, run_dir / "models" / "controlnet")
    else:
        ckpt_path, edlora_path = ensure_demo_models(run_dir)
        checkpoint, edloras = ckpt_path.name, [edlora_path.name]
        words = [concept_words(edlora_path)]
        prompt = args.prompt or positive_text(workflow)
        size, steps, timeout = args.size, args.steps, args.timeout or 600
        fuse = not args.no_fusion
        if fuse:
            _, concept_paths = ensure_demo_concepts(run_dir)
            fusion_edloras = [path.name for path in concept_paths]
            controlnet = ensure_demo_controlnet(run_dir).name
        capture = (args.capture_steps or 2, args.capture_resolution or 64)
        fused_prefix, fusion_prompt = DEMO_FUSED_PREFIX, None
        print("NOTE: no model given, so this demo uses a RANDOM SD1.5-topology checkpoint and RANDOM "
              "ED-LoRAs (words <cat1> <cat2>, <dog1> <dog2>, <owl1> <owl2>). They only prove the pipeline "
              "runs: the images are noise.\n"
              "      For real images: bash scripts/demo.sh --checkpoint <SD1.5 file> --edlora <ED-LoRA file(s)> "
              "[--prompt ...]")
    for file_words, name in zip(words, edloras):
        if not any(w in prompt for w in file_words):
            raise SystemExit(f"the prompt {prompt!r} uses none of {name}'s concept words "
                             f"({' '.join(file_words)}); write them into --prompt")
    graph = build_prompt(workflow, checkpoint, edloras, prompt, args.negative, size, size, steps, args.seed)
    fusion_graph = regional_workflow = None
    if fuse:
        fusion_graph = build_fusion_prompt(
            load_workflow(FUSION_WORKFLOW), checkpoint, fusion_edloras, fusion_prompt, args.negative, size, size,
            steps, args.seed, capture_steps=capture[0], capture_resolution=capture[1], method=args.method,
            filename_prefix=fused_prefix)
        if REGIONAL_WORKFLOW.is_file():
            regional_workflow = load_workflow(REGIONAL_WORKFLOW)
        else:
            print(f"(no {REGIONAL_WORKFLOW.relative_to(ROOT)}: the regional step is skipped)")

    import torch
    cpu = args.cpu or not torch.cuda.is_available()
    server = harness_server.Server(run_dir, cpu=cpu)
    running = server.recorded_pid()
    if running is not None:
        print(f"Using the ComfyUI server already running from {run_dir} (pid {running}, {server.url})")
    else:
        if fuse and not real:  # each run saves a new ~0.5 GB demo checkpoint: drop the older ones
            for old in (host_models_dir(server) / "checkpoints").glob(f"{DEMO_FUSED_PREFIX}_*_.*"):
                old.unlink()
        print(f"Starting ComfyUI ({server.host_dir}) headless on "
              f"{'the CPU (--cpu)' if cpu else 'the device ComfyUI picks (CUDA is available)'}; "
              f"log {server.log_path}")
        start = time.perf_counter()
        server.start(timeout=120)
        print(f"  ready at {server.url} in {time.perf_counter() - start:.1f} s")
    out = Path(args.out).resolve()
    results = []  # (what, path fetched through /view, ComfyUI's copy, description)
    try:
        client = server.client(timeout=60)
        latent = graph[_only(graph, "EmptyLatentImage")]["inputs"]
        sampler = graph[_only(graph, "KSampler")]["inputs"]
        print(f"[1/{3 if regional_workflow else 2 if fuse else 1}] Queueing workflows/{WORKFLOW.name}: "
              f"{checkpoint} + {', '.join(edloras)}, "
              f"{latent['width']}x{latent['height']}, {sampler['steps']} steps, seed {sampler['seed']}\n"
              f"  prompt: {prompt}")
        _, info, data = _run_image(client, graph, timeout, "txt2img")
        results.append(("ED-LoRA txt2img image", out, info, _save_png(data, out)))

        if fuse:
            fuse_inputs = fusion_graph[_only(fusion_graph, "MixOfShowGradientFuse")]["inputs"]
            sampler = fusion_graph[_only(fusion_graph, "KSampler")]["inputs"]
            print(f"[2/{3 if regional_workflow else 2}] Queueing workflows/{FUSION_WORKFLOW.name}: "
                  f"{fuse_inputs['method']} fusion of {', '.join(fusion_edloras)} "
                  f"({fuse_inputs['capture_steps']} capture steps at {fuse_inputs['capture_resolution']} px), "
                  f"saved with Save Fused Model, then sampled\n"
                  f"  prompt: {positive_text(fusion_graph)}")
            entry, info, data = _run_image(client, fusion_graph, timeout, "fusion")
            fused_out = out.with_name(out.stem + "_fused" + out.suffix)
            results.append(("fused-model image", fused_out, info, _save_png(data, fused_out)))
            saved = saved_checkpoints(entry, fusion_graph)
            if not saved:
                raise SystemExit(f"Save Fused Model reported no file: {entry.get('outputs')}")
            models_dir = host_models_dir(server)
            for name in saved:
                print(f"  Save Fused Model wrote {models_dir / name}")
            fused_name = Path(saved[0]).relative_to("checkpoints").as_posix()

            if regional_workflow:
                scene_words = {}
                if real:  # the workflow's words become the first two real concepts' words
                    scene_words = {" ".join(DEMO_WORDS): " ".join(words[0]), "<dog1> <dog2>": " ".join(words[1])}
                pose = None
                if controlnet:
                    loader = regional_workflow[_only(regional_workflow, "LoadImage")]["inputs"]["image"]
                    pose = client.upload_image(ROOT / "workflows" / "poses" / loader)
                regional = build_regional_prompt(
                    regional_workflow, fused_name, scene_words, controlnet, pose,
                    width=1024 if real else None, height=512 if real else None,
                    steps=args.steps or (25 if real else None), seed=args.seed)
                latent = regional[_only(regional, "EmptyLatentImage")]["inputs"]
                regions = [n["inputs"]["prompt"].split(",")[0] for n in regional.values()
                           if n["class_type"] == "MixOfShowRegionPrompt"]
                print(f"[3/3] Queueing workflows/{REGIONAL_WORKFLOW.name} with Load Fused Model ({fused_name}): "
                      f"regions {' | '.join(regions)}, {latent['width']}x{latent['height']}, "
                      f"{'keypose ' + controlnet if controlnet else 'no keypose'}")
                _, info, data = _run_image(client, regional, timeout, "regional")
                regional_out = out.with_name(out.stem + "_regional" + out.suffix)
                results.append(("regional image (fused model)", regional_out, info, _save_png(data, regional_out)))
    except harness_server.ComfyError as e:
        raise SystemExit(f"ComfyUI reported an error:\n{e}\n(server log: {server.log_path})")
    finally:
        if running is None:
            server.stop()
    print("Outputs:")
    for what, path, info, description in results:
        copy_path = run_dir / "output" / info.get("subfolder", "") / info["filename"]
        print(f"  {what} ({description}, fetched through /view): {path}\n      ComfyUI's own copy: {copy_path}")
    if fuse:
        for name in saved:
            print(f"  fused model file: {host_models_dir(server) / name}")
    if not real:
        print("(random demo model: the images are noise by design)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
