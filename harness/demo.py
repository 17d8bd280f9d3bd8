"""End-to-end demo: one ED-LoRA txt2img image through a real, headless ComfyUI server.

    bash scripts/demo.sh                                   # random demo model: the image is noise
    bash scripts/demo.sh --checkpoint sd15.safetensors --edlora potter.pth [--prompt "..."]

With no model given it generates (once) a seeded random SD1.5-topology checkpoint and a random
ED-LoRA with the words <cat1> <cat2>; both only prove the pipeline runs. With a real SD1.5
checkpoint and real ED-LoRA file(s) they are linked into the run's model folders and used;
the prompt must contain each ED-LoRA's concept words. Environment variables
MIXOFSHOW_CHECKPOINT, MIXOFSHOW_EDLORA (several separated by ':') and MIXOFSHOW_PROMPT
stand in for the options.
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
RUN_DIR = ROOT / ".host" / "run"
DEMO_CHECKPOINT = "mixofshow_demo_sd15.safetensors"
DEMO_EDLORA = "mixofshow_demo_cat.safetensors"
DEMO_WORDS = ("<cat1>", "<cat2>")
DEMO_SEED = 0


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
                        help="real ED-LoRA file(s), .safetensors or original Mix-of-Show .pth [MIXOFSHOW_EDLORA]")
    parser.add_argument("--prompt", default=env.get("MIXOFSHOW_PROMPT") or None,
                        help="positive prompt; must contain each ED-LoRA's concept words [MIXOFSHOW_PROMPT]")
    parser.add_argument("--negative", default=None)
    parser.add_argument("--size", type=int, default=None,
                        help="image width and height (default 64 for the demo model, 512 for a real one)")
    parser.add_argument("--steps", type=int, default=None, help="default 8 (demo model) or 25 (real)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--run-dir", default=str(RUN_DIR), help="server run folder (default .host/run)")
    parser.add_argument("--out", default=str(ROOT / "out" / "mixofshow_demo.png"),
                        help="where the image fetched through /view is written")
    parser.add_argument("--cpu", action="store_true",
                        help="run ComfyUI with --cpu even when CUDA is available (default: CUDA if torch sees it)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the prompt (default 300, real 3600)")
    args = parser.parse_args(argv)
    if args.edlora and not args.checkpoint:
        parser.error("an ED-LoRA needs the SD1.5 checkpoint it was trained for: also give --checkpoint "
                     "(the random demo model has other weights, so a real ED-LoRA would not mean anything on it)")
    if args.checkpoint and not args.edlora:
        parser.error("a real checkpoint needs a real ED-LoRA: also give --edlora (the demo ED-LoRA is "
                     "shaped for the random demo model only)")
    return args


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    workflow = load_workflow()
    real = bool(args.checkpoint)

    if real:
        checkpoint = link_model(args.checkpoint, run_dir / "models" / "checkpoints")
        edloras, words = [], []
        for path in args.edlora:
            edloras.append(link_model(path, run_dir / "models" / "edlora"))
            words.append(concept_words(path))
            print(f"ED-LoRA {edloras[-1]}: concept words {' '.join(words[-1])}")
        prompt = args.prompt or "a photo of " + " and ".join(" ".join(w) for w in words)
        size, steps, timeout = args.size or 512, args.steps or 25, args.timeout or 3600
    else:
        ckpt_path, edlora_path = ensure_demo_models(run_dir)
        checkpoint, edloras = ckpt_path.name, [edlora_path.name]
        words = [concept_words(edlora_path)]
        prompt = args.prompt or positive_text(workflow)
        size, steps, timeout = args.size, args.steps, args.timeout or 300
        print("NOTE: no model given, so this demo uses a RANDOM SD1.5-topology checkpoint and a RANDOM "
              "ED-LoRA (words <cat1> <cat2>). They only prove the pipeline runs: the image is noise.\n"
              "      For a real image: bash scripts/demo.sh --checkpoint <SD1.5 file> --edlora <ED-LoRA file> "
              "[--prompt ...]")
    for file_words, name in zip(words, edloras):
        if not any(w in prompt for w in file_words):
            raise SystemExit(f"the prompt {prompt!r} uses none of {name}'s concept words "
                             f"({' '.join(file_words)}); write them into --prompt")
    graph = build_prompt(workflow, checkpoint, edloras, prompt, args.negative, size, size, steps, args.seed)

    import torch
    cpu = args.cpu or not torch.cuda.is_available()
    server = harness_server.Server(run_dir, cpu=cpu)
    running = server.recorded_pid()
    if running is not None:
        print(f"Using the ComfyUI server already running from {run_dir} (pid {running}, {server.url})")
    else:
        print(f"Starting ComfyUI ({server.host_dir}) headless on "
              f"{'the CPU (--cpu)' if cpu else 'the device ComfyUI picks (CUDA is available)'}; "
              f"log {server.log_path}")
        start = time.perf_counter()
        server.start(timeout=120)
        print(f"  ready at {server.url} in {time.perf_counter() - start:.1f} s")
    try:
        client = server.client(timeout=60)
        latent = graph[_only(graph, "EmptyLatentImage")]["inputs"]
        sampler = graph[_only(graph, "KSampler")]["inputs"]
        print(f"Queueing workflows/{WORKFLOW.name}: {checkpoint} + {', '.join(edloras)}, "
              f"{latent['width']}x{latent['height']}, {sampler['steps']} steps, seed {sampler['seed']}\n"
              f"  prompt: {prompt}")
        start = time.perf_counter()
        entry = client.run(graph, timeout=timeout)
        images = client.images(entry)
        if not images:
            raise SystemExit(f"the prompt finished but produced no image: {entry.get('outputs')}")
        info, data = images[0]
        width, height = png_size(data)
        print(f"  done in {time.perf_counter() - start:.1f} s")
    except harness_server.ComfyError as e:
        raise SystemExit(f"ComfyUI reported an error:\n{e}\n(server log: {server.log_path})")
    finally:
        if running is None:
            server.stop()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    saved = run_dir / "output" / info.get("subfolder", "") / info["filename"]
    print(f"Image ({width}x{height} PNG, fetched through /view): {out}")
    print(f"ComfyUI's own copy: {saved}")
    if not real:
        print("(random demo model: the image is noise by design)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
