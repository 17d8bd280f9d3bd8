"""End-to-end Mix-of-Show demo through a real, headless ComfyUI server: train concepts, fuse them
into one model, sample them in regions.

    bash scripts/demo.sh                                   # random demo model: the images are noise
    bash scripts/demo.sh --checkpoint sd15.safetensors --edlora potter.pth hermione.pth [--prompt "..."]
    bash scripts/demo.sh --checkpoint sd15.safetensors --train photos/potter=man photos/hermione=woman

The flow, one server, API workflows queued through POST /prompt:
  1. workflows/api/edlora_train_api.json, once per concept to train: EDLoRA Train writes
     models/edlora/<name>.safetensors (plus its loss curve and α 0 / 0.7 / 1.0 previews);
  2. workflows/api/edlora_txt2img_api.json: one image with the ED-LoRA(s) (EDLoRA Loader; several are
     chained, a plain LoRA sum; the demo uses its first concept);
  3. workflows/api/fuse_three_concepts_api.json: all ED-LoRAs fused (Gradient Fuse), saved as one
     checkpoint + .fusionstats (Save Fused Model), and an image of the concepts in one prompt;
  4. workflows/api/regional_two_concepts_api.json: the saved checkpoint loaded with Load Fused Model,
     the first two concepts in two boxes over a keypose image (Regional Sampler).
With no model given it generates (once) a seeded random SD1.5-topology checkpoint, drawings of a
toy cat, a toy dog and a toy owl (captions and masks) and a random keypose ControlNet, trains <cat1> <cat2>,
<dog1> <dog2> and <owl1> <owl2> for a few steps at 64 px (the ED-LoRA names the shipped UI workflows
default to), and runs 2-4 on them; this only proves the pipeline
runs (the images are noise). With a real SD1.5 checkpoint, real ED-LoRA files (--edlora) and/or
dataset folders (--train FOLDER[=class word]: images with same-name .txt captions that write the
concept as <TOK>, masks in FOLDER/masks if present; the words become <folder1> <folder2>) are
used; the prompt must contain each concept's words. Steps 3-4 need at least two concepts; step 4
uses --controlnet (a keypose ControlNet or T2I-Adapter) when given and otherwise samples the
regions without a pose. Environment variables MIXOFSHOW_CHECKPOINT, MIXOFSHOW_EDLORA (several
separated by ':'), MIXOFSHOW_PROMPT and MIXOFSHOW_CONTROLNET stand in for the options.
"""
import argparse
import importlib.util
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "harness":
    del sys.path[0]  # run as a script: keep harness/*.py from shadowing ComfyUI's top-level modules


def _bootstrap():
    """Registers the repo as the package comfyui_mixofshow (see harness/__init__.py)."""
    if "comfyui_mixofshow" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_mixofshow_bootstrap", ROOT / "harness" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.register_plugin_package()


_bootstrap()
from comfyui_mixofshow.harness import server as harness_server  # noqa: E402
from comfyui_mixofshow.harness.demo_data import PLACEHOLDER, write_concept_dataset  # noqa: E402
from comfyui_mixofshow.harness.demo_models import (  # noqa: E402
    DEMO_WORDS, RUN_DIR, demo_edlora_name, ensure_demo_checkpoint, ensure_demo_controlnet, host_models_dir, link_model)
from comfyui_mixofshow.harness.workflows import (  # noqa: E402
    FUSION_WORKFLOW, REGIONAL_WORKFLOW, TRAIN_WORKFLOW, WORKFLOW, build_fusion_prompt, build_prompt,
    build_regional_prompt, build_train_prompt, load_workflow, only_node, png_size, positive_text, region_labels,
    reported_files)

DEMO_FUSED_PREFIX = "mixofshow_fused_demo"
# (animal, drawing seed): words <cat1> <cat2>, <dog1> <dog2>, <owl1> <owl2>; the three the shipped workflows use
DEMO_TRAINING = (("cat", 1), ("dog", 2), ("owl", 3))
RANDOM_INIT = "<rand-0.013>"  # the original's random initialiser for the first word


@dataclass
class Training:
    """One concept to train: its dataset and words, and the ED-LoRA name it is saved as."""
    label: str               # names the preview files
    dataset: Path
    masks: Path
    words: tuple
    initializers: tuple
    output_name: str

    @property
    def edlora(self):
        return f"{self.output_name}.safetensors"


@dataclass
class Plan:
    """What one demo run does, with names as the server lists them."""
    real: bool
    checkpoint: str
    edloras: list            # ED-LoRA file names, the trained ones included
    words: list              # each ED-LoRA's concept words
    prompt: str
    size: int
    steps: int
    timeout: float
    training: list = field(default_factory=list)
    train_settings: dict = field(default_factory=dict)
    fuse: bool = True
    capture: tuple = (2, 64)
    controlnet: str = None
    fused_prefix: str = DEMO_FUSED_PREFIX
    fusion_prompt: str = None

    @property
    def txt2img_edloras(self):
        """A real run chains every ED-LoRA (a plain LoRA sum); the demo's prompt names the first."""
        return self.edloras if self.real else self.edloras[:1]


def concept_words(path):
    from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora
    return load_edlora(str(path)).words


# -- plans ------------------------------------------------------------------------------------
def demo_plan(args, run_dir):
    checkpoint = ensure_demo_checkpoint(run_dir)
    training = []
    for animal, seed in DEMO_TRAINING:
        images, masks = write_concept_dataset(run_dir / "input" / f"mixofshow_demo_{animal}", animal, seed=seed)
        training.append(Training(animal, images, masks, (f"<{animal}1>", f"<{animal}2>"), (RANDOM_INIT, animal),
                                 Path(demo_edlora_name(animal)).stem))
    settings = dict(steps=args.train_steps or 6, batch_size=1, resolution=64, caption_template="object",
                    preview_steps=4)
    fuse = not args.no_fusion
    return Plan(real=False, checkpoint=checkpoint.name, edloras=[t.edlora for t in training],
                words=[t.words for t in training], prompt=args.prompt or positive_text(load_workflow()),
                size=args.size, steps=args.steps, timeout=args.timeout or 900, training=training,
                train_settings=settings, fuse=fuse, capture=(args.capture_steps or 2, args.capture_resolution or 64),
                controlnet=ensure_demo_controlnet(run_dir).name if fuse else None)


def folder_training(spec):
    """A Training for `--train FOLDER[=class word]`: words <folder1> <folder2>."""
    folder, _, class_word = spec.partition("=")
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SystemExit(f"--train {spec}: {folder} is not a folder")
    stem = re.sub(r"[^a-z0-9_]+", "_", folder.name.lower()).strip("_") or "concept"
    return Training(stem, folder, folder / "masks" if (folder / "masks").is_dir() else "", (f"<{stem}1>", f"<{stem}2>"),
                    (RANDOM_INIT, class_word.strip() or RANDOM_INIT), stem)


def copied_to_input(item, run_dir):
    """The Training with its dataset copied into the server's input folder (EDLoRA Train reads only there)."""
    target = Path(run_dir) / "input" / f"mixofshow_train_{item.output_name}"
    shutil.copytree(item.dataset, target, dirs_exist_ok=True)
    return replace(item, dataset=target, masks=target / "masks" if item.masks else "")


def real_plan(args, run_dir):
    checkpoint = link_model(args.checkpoint, run_dir / "models" / "checkpoints")
    edloras, words = [], []
    for path in args.edlora:
        edloras.append(link_model(path, run_dir / "models" / "edlora"))
        words.append(concept_words(path))
        print(f"ED-LoRA {edloras[-1]}: concept words {' '.join(words[-1])}")
    training = [copied_to_input(folder_training(spec), run_dir) for spec in args.train]
    for item in training:
        print(f"To train: {item.dataset} as {' '.join(item.words)} -> models/edlora/{item.edlora}")
    edloras += [t.edlora for t in training]
    words += [t.words for t in training]
    prompt = args.prompt or "a photo of " + " and ".join(" ".join(w) for w in words)
    return Plan(real=True, checkpoint=checkpoint, edloras=edloras, words=words, prompt=prompt,
                size=args.size or 512, steps=args.steps or 25, timeout=args.timeout or 3600 * 12, training=training,
                train_settings=dict(steps=args.train_steps), fuse=len(edloras) >= 2 and not args.no_fusion,
                capture=(args.capture_steps or 20, args.capture_resolution or 512),
                controlnet=link_model(args.controlnet, run_dir / "models" / "controlnet") if args.controlnet else None,
                fused_prefix="mixofshow_fused", fusion_prompt=prompt)


def check_prompt(plan):
    for file_words, name in zip(plan.words, plan.txt2img_edloras):
        if not any(w in plan.prompt for w in file_words):
            raise SystemExit(f"the prompt {plan.prompt!r} uses none of {name}'s concept words "
                             f"({' '.join(file_words)}); write them into --prompt")


# -- running ----------------------------------------------------------------------------------
class DemoRun:
    """Queues the plan's workflows on one server, saves the images fetched through /view."""

    def __init__(self, client, server, plan, out, method, seed):
        self.client, self.server, self.plan, self.out = client, server, plan, out
        self.method, self.seed = method, seed
        self.results = []   # (what, path fetched through /view, ComfyUI's copy)
        self.fused_files = []
        self.total = len(plan.training) + 1 + (2 if plan.fuse else 0)
        self.number = 0
        self.step = "starting"

    def announce(self, text):
        self.number += 1
        self.step = f"[{self.number}/{self.total}] {text}"
        print(self.step)

    def run(self, graph):
        start = time.perf_counter()
        entry = self.client.run(graph, timeout=self.plan.timeout)
        print(f"  done in {time.perf_counter() - start:.1f} s")
        return entry

    def save_images(self, entry, node_id, what, suffix):
        """Fetches node_id's images through /view into out (<stem><suffix>[_i].png)."""
        images = self.client.images(entry, node_id)
        if not images:
            raise SystemExit(f"{what}: the prompt finished but produced no image: {entry.get('outputs')}")
        for index, (info, data) in enumerate(images):
            name = self.out.stem + suffix + (f"_{index}" if len(images) > 1 else "") + self.out.suffix
            path = self.out.with_name(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            width, height = png_size(data)
            copy = self.server.run_dir / info.get("type", "output") / info.get("subfolder", "") / info["filename"]
            self.results.append((f"{what} ({width}x{height} PNG)", path, copy))

    def train(self, item):
        graph = build_train_prompt(load_workflow(TRAIN_WORKFLOW), self.plan.checkpoint, item.dataset, item.words,
                                   item.initializers, item.output_name, item.masks, seed=self.seed,
                                   **self.plan.train_settings)
        settings = graph[only_node(graph, "MixOfShowEDLoRATrain")]["inputs"]
        steps = settings["steps"] or f"{settings['repeats']} repeats of"
        self.announce(f"Queueing workflows/api/{TRAIN_WORKFLOW.name}: EDLoRA Train {' '.join(item.words)} on "
                      f"{item.dataset}, {steps} steps, batch {settings['batch_size']}, {settings['resolution']} px")
        entry = self.run(graph)
        name = reported_files(entry, graph, "MixOfShowEDLoRATrain")[0]
        print(f"  EDLoRA Train wrote models/edlora/{name}")
        self.save_images(entry, only_node(graph, "SaveImage"), f"training previews of {name} (α 0, 0.7, 1)",
                         f"_train_{item.label}")
        self.save_images(entry, only_node(graph, "PreviewImage"), f"loss curve of {name}", f"_loss_{item.label}")

    def txt2img(self):
        plan = self.plan
        graph = build_prompt(load_workflow(), plan.checkpoint, plan.txt2img_edloras, plan.prompt, None, plan.size,
                             plan.size, plan.steps, self.seed)
        latent = graph[only_node(graph, "EmptyLatentImage")]["inputs"]
        sampler = graph[only_node(graph, "KSampler")]["inputs"]
        self.announce(f"Queueing workflows/api/{WORKFLOW.name}: {plan.checkpoint} + {', '.join(plan.txt2img_edloras)}, "
                      f"{latent['width']}x{latent['height']}, {sampler['steps']} steps, seed {sampler['seed']}\n"
                      f"  prompt: {positive_text(graph)}")
        self.save_images(self.run(graph), only_node(graph, "SaveImage"), "ED-LoRA txt2img image", "")

    def fuse(self):
        """Fuses all ED-LoRAs; returns the saved checkpoint's name as Load Fused Model lists it."""
        plan = self.plan
        capture_steps, capture_resolution = plan.capture
        graph = build_fusion_prompt(load_workflow(FUSION_WORKFLOW), plan.checkpoint, plan.edloras, plan.fusion_prompt,
                                    None, plan.size, plan.size, plan.steps, self.seed, capture_steps=capture_steps,
                                    capture_resolution=capture_resolution, method=self.method,
                                    filename_prefix=plan.fused_prefix)
        self.announce(f"Queueing workflows/api/{FUSION_WORKFLOW.name}: {self.method} fusion of "
                      f"{', '.join(plan.edloras)} ({capture_steps} capture steps at {capture_resolution} px), "
                      f"saved with Save Fused Model, then sampled\n  prompt: {positive_text(graph)}")
        entry = self.run(graph)
        self.save_images(entry, only_node(graph, "SaveImage"), "fused-model image", "_fused")
        saved = reported_files(entry, graph, "MixOfShowSaveFusedModel")
        self.fused_files = [host_models_dir(self.server) / name for name in saved]
        for path in self.fused_files:
            print(f"  Save Fused Model wrote {path}")
        if not plan.real:  # each run saves a new ~0.5 GB demo checkpoint: drop the older ones now
            for old in (host_models_dir(self.server) / "checkpoints").glob(f"{DEMO_FUSED_PREFIX}_*_.*"):
                if old not in self.fused_files:
                    old.unlink()
        return Path(saved[0]).relative_to("checkpoints").as_posix()

    def regional(self, fused_name):
        plan, workflow = self.plan, load_workflow(REGIONAL_WORKFLOW)
        scene_words = {}
        if plan.real:  # the workflow's words become the first two concepts' words
            scene_words = {" ".join(DEMO_WORDS): " ".join(plan.words[0]), "<dog1> <dog2>": " ".join(plan.words[1])}
        pose = None
        if plan.controlnet:
            pose_file = workflow[only_node(workflow, "LoadImage")]["inputs"]["image"]
            pose = self.client.upload_image(ROOT / "workflows" / "poses" / pose_file)
        graph = build_regional_prompt(workflow, fused_name, scene_words, plan.controlnet, pose,
                                      width=1024 if plan.real else None, height=512 if plan.real else None,
                                      steps=plan.steps if plan.real else None, seed=self.seed)
        latent = graph[only_node(graph, "EmptyLatentImage")]["inputs"]
        self.announce(f"Queueing workflows/api/{REGIONAL_WORKFLOW.name} with Load Fused Model ({fused_name}): "
                      f"regions {' | '.join(region_labels(graph))}, {latent['width']}x{latent['height']}, "
                      f"{'keypose ' + plan.controlnet if plan.controlnet else 'no keypose'}")
        self.save_images(self.run(graph), only_node(graph, "SaveImage"), "regional image (fused model)", "_regional")

    def all(self):
        for item in self.plan.training:
            self.train(item)
        self.txt2img()
        if self.plan.fuse:
            self.regional(self.fuse())


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
    parser.add_argument("--train", nargs="+", default=[], metavar="FOLDER[=CLASS]",
                        help=f"dataset folder(s) to train with EDLoRA Train on the real checkpoint (captions write "
                             f"the concept as {PLACEHOLDER}; CLASS initialises the second word, e.g. man, dog)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="EDLoRA Train steps (default 6 for the demo model; real: the workflow's 500 repeats)")
    parser.add_argument("--prompt", default=env.get("MIXOFSHOW_PROMPT") or None,
                        help="positive prompt; must contain each concept's words [MIXOFSHOW_PROMPT]")
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
    parser.add_argument("--no-fusion", action="store_true", help="stop after training and the txt2img image")
    parser.add_argument("--run-dir", default=str(RUN_DIR), help="server run folder (default .host/run)")
    parser.add_argument("--out", default=str(ROOT / "out" / "mixofshow_demo.png"),
                        help="where the txt2img image fetched through /view is written; the others go beside "
                             "it as <name>_train_*, _loss_*, _fused and _regional PNGs")
    parser.add_argument("--cpu", action="store_true",
                        help="run ComfyUI with --cpu even when CUDA is available (default: CUDA if torch sees it)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for each prompt (default 900, real 12 hours)")
    args = parser.parse_args(argv)
    if (args.edlora or args.train) and not args.checkpoint:
        parser.error("an ED-LoRA or a training set needs the SD1.5 checkpoint it is for: also give --checkpoint "
                     "(the random demo model has other weights)")
    if args.checkpoint and not (args.edlora or args.train):
        parser.error("a real checkpoint needs real concepts: also give --edlora and/or --train")
    if args.controlnet and not args.checkpoint:
        parser.error("--controlnet is for a real model; the demo model brings its own random keypose ControlNet")
    return args


def failure_line(error):
    """An error as one line: ComfyUI's messages joined with ' | ', other errors with their type."""
    text = " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if isinstance(error, harness_server.ComfyError) else f"{type(error).__name__}: {text}"


def start_server(run_dir, cpu):
    """(server, whether this run started it)."""
    server = harness_server.Server(run_dir, cpu=cpu)
    running = server.recorded_pid()
    if running is not None:
        print(f"Using the ComfyUI server already running from {run_dir} (pid {running}, {server.url})")
        return server, False
    print(f"Starting ComfyUI ({server.host_dir}) headless on "
          f"{'the CPU' if cpu else 'the device ComfyUI picks (CUDA is available)'}; log {server.log_path}")
    start = time.perf_counter()
    server.start(timeout=120)
    print(f"  ready at {server.url} in {time.perf_counter() - start:.1f} s")
    return server, True


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    plan = real_plan(args, run_dir) if args.checkpoint else demo_plan(args, run_dir)
    if not plan.real:
        print("NOTE: no model given, so this demo uses a RANDOM SD1.5-topology checkpoint and trains "
              "<cat1> <cat2>, <dog1> <dog2> and <owl1> <owl2> on generated drawings for a few steps. It only proves the pipeline "
              "runs: the images are noise.\n"
              "      For real images: bash scripts/demo.sh --checkpoint <SD1.5 file> --edlora <ED-LoRA file(s)> "
              "[--train <dataset folder(s)>] [--prompt ...]")
    check_prompt(plan)
    import torch
    server, started = start_server(run_dir, args.cpu or not torch.cuda.is_available())
    demo = DemoRun(server.client(timeout=60), server, plan, Path(args.out).resolve(), args.method, args.seed)
    try:
        demo.all()
    except (harness_server.ComfyError, OSError) as e:  # OSError: HTTP errors and timeouts left after retries
        raise SystemExit(f"demo failed at {demo.step.splitlines()[0]}: {failure_line(e)} (server log: {server.log_path})")
    finally:
        if started:
            server.stop()
    print("Outputs (fetched through /view; ComfyUI's own copy below each):")
    for what, path, copy in demo.results:
        print(f"  {what}: {path}\n      {copy}")
    for path in demo.fused_files:
        print(f"  fused model file: {path}")
    if not plan.real:
        print("(random demo model: the images are noise by design)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
