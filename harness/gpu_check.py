"""GPU check: the whole Mix-of-Show flow in one process, through the plugin's node classes and the
host's own loaders and samplers, with assertions on what happens inside the UNet.

    bash scripts/gpu_check.sh                      # on a CUDA machine: every prepared host, both VRAM modes
    python harness/gpu_check.py --host DIR [--preset gpu|tiny] [--scratch DIR] [--disable-dynamic-vram] [-- --cpu]

Checks (one PASS/FAIL line each, with its time and peak GPU memory):
  load          a generated SD1.5-topology checkpoint through CheckpointLoaderSimple
  edlora        EDLoRA Loader -> EDLoRA Text Encode -> KSampler; forward pre-hooks on the 16 attn2
                modules: in every UNet call cross-attention layer l receives the layer-l encoding
                (the prompt encoded by the host's own textual-inversion path with row l of each
                concept word) for the positive rows, the negative prompt's for the others, and the
                16 encodings differ
  fusion        EDLoRA Concept x2 -> Gradient Fuse; the statistics' Gram row counts equal
                concepts x steps x tokens (UNet layers at their resolution), x 2 prompts x 16 copies x 77
                (text encoder), x 2 prompts x 77 (cross-attention k/v)
  save-reload   Save Fused Model -> Load Fused Model gives the same sample as before saving
                (relative L2 error within the stated tolerance) while the base model's differs
  train         EDLoRA Train uninterrupted; again interrupted (nodes.interrupt_processing, as the
                server's /interrupt does) from the progress hook, then resumed from "latest": the
                final ED-LoRA equals the uninterrupted one
  regional      Region Prompt x2 -> Apply Regions -> KSampler; every attn2 replace patch Apply
                Regions installs is counted: it changes the attention output (against plain scaled
                dot-product attention) in all 16 layers in every sampling step (told apart by sigma)
Exit status 1 when any check fails. The tiny preset runs the same code on the CPU in
tests/host/test_gpu_check.py.
"""
import argparse
import copy
import glob
import math
import os
import re
import sys
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DYNAMIC_VRAM_FLAG = "--disable-dynamic-vram"


def host_knows(host, flag):
    """Whether the host's comfy/cli_args.py defines `flag`."""
    cli_args = Path(host) / "comfy" / "cli_args.py"
    return cli_args.is_file() and f'"{flag}"' in cli_args.read_text(encoding="utf-8")


def _start_host(host, host_flags):
    """Puts the host on sys.path and parses its command line as main.py does (before torch loads)."""
    if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "harness":
        del sys.path[0]  # run as a script: keep harness/*.py from shadowing ComfyUI's modules
    sys.path.insert(0, str(host))
    os.environ["MIXOFSHOW_COMFYUI"] = str(host)
    import comfy.options
    comfy.options.enable_args_parsing()
    sys.argv = [str(Path(host) / "main.py"), *host_flags]
    import comfy.cli_args  # parses sys.argv
    import cuda_malloc  # noqa: F401  the host's default allocator choice, made before torch starts CUDA
    if _dynamic_vram_requested(comfy.cli_args):
        import comfy_aimdo.control  # main.py starts it here, before torch (ComfyUI >= 0.16)
        args = comfy.cli_args.args
        headroom = None if getattr(args, "reserve_vram", None) is None else int(args.reserve_vram * 1024 ** 3)
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom)
        except TypeError:  # older comfy-aimdo protocol
            comfy_aimdo.control.init()


def _dynamic_vram_requested(cli_args):
    return bool(getattr(cli_args, "enables_dynamic_vram", lambda: False)())


def _load_plugin():
    """Registers the repository as `comfyui_mixofshow` and runs its __init__, as ComfyUI loads it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_mixofshow_bootstrap", ROOT / "harness" / "__init__.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    package = bootstrap.register_plugin_package()
    if not hasattr(package, "WEB_DIRECTORY"):
        package.__spec__ = importlib.util.spec_from_file_location(
            "comfyui_mixofshow", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        package.__spec__.loader.exec_module(package)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="ComfyUI folder (with main.py)")
    parser.add_argument("--preset", choices=("gpu", "tiny"), default="gpu")
    parser.add_argument("--scratch", default=str(ROOT / ".host" / "gpu_check"),
                        help="folder for the generated checkpoint and every file the nodes write")
    parser.add_argument(DYNAMIC_VRAM_FLAG, action="store_true",
                        help="pass the flag to the host (only where its comfy/cli_args.py defines it)")
    parser.add_argument("host_flags", nargs="*", help="further host flags after --, e.g. -- --cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    _options = _parse(sys.argv[1:])
    _flags = list(_options.host_flags)
    if _options.disable_dynamic_vram and host_knows(_options.host, DYNAMIC_VRAM_FLAG):
        _flags.append(DYNAMIC_VRAM_FLAG)
    _start_host(Path(_options.host).resolve(), _flags)
    _load_plugin()
    from comfyui_mixofshow.harness.gpu_check import main
    sys.exit(main(_options, _flags))

import comfy.cli_args  # noqa: E402
import comfy.model_management  # noqa: E402
import folder_paths  # noqa: E402
import nodes as host_nodes  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ..mixofshow_core.edlora_format import save_edlora  # noqa: E402
from ..nodes.edlora_concept import EDLoRAConcept  # noqa: E402
from ..nodes.edlora_loader import EDLoRALoader  # noqa: E402
from ..nodes.edlora_text_encode import EDLoRATextEncode  # noqa: E402
from ..nodes.edlora_train import EDLoRATrain  # noqa: E402
from ..nodes.fused_model import LoadFusedModel, SaveFusedModel  # noqa: E402
from ..nodes.gradient_fuse import GradientFuse  # noqa: E402
from ..nodes.region_prompt import RegionPrompt  # noqa: E402
from ..nodes.regional_sampler import ApplyRegions  # noqa: E402
from . import models as harness_models  # noqa: E402
from .demo_data import PLACEHOLDER, write_concept_dataset  # noqa: E402
from .edlora_fixtures import model_lora_shapes, random_edlora  # noqa: E402

LAYERS = 16
TEXT_TOKENS = 77
FUSION_PROMPTS = 2  # "photo of a {words}" and "{words}"
# SD1.5's cross-attention modules in transformer_index order, with the downsampling level they run at
ATTN2_MODULES = tuple(
    [(f"input_blocks.{n}.1.transformer_blocks.0.attn2", level) for n, level in ((1, 0), (2, 0), (4, 1), (5, 1),
                                                                                (7, 2), (8, 2))]
    + [("middle_block.1.transformer_blocks.0.attn2", 3)]
    + [(f"output_blocks.{n}.1.transformer_blocks.0.attn2", 2 - (n - 3) // 3) for n in range(3, 12)])
WORDS = {"a": ("<gca1>", "<gca2>"), "b": ("<gcb1>", "<gcb2>")}


@dataclass(frozen=True)
class Settings:
    checkpoint: str          # "sd15": the SD1.5-topology checkpoint; "tiny": the harness's tiny UNet and CLIP
    size: int                # sampling width and height in pixels
    steps: int               # sampling steps (euler: one UNet call per step)
    cfg: float
    capture_steps: int       # Gradient Fuse
    capture_resolution: int
    train_steps: int         # EDLoRA Train, interrupted after interrupt_at steps
    interrupt_at: int
    train_resolution: int


PRESETS = {
    "gpu": Settings(checkpoint="sd15", size=512, steps=20, cfg=7.5, capture_steps=20, capture_resolution=512,
                    train_steps=20, interrupt_at=10, train_resolution=512),
    # CPU settings of the test suite; 128 px keeps the middle block at 2x2 tokens, so both regions reach it
    "tiny": Settings(checkpoint="tiny", size=128, steps=2, cfg=5.0, capture_steps=2, capture_resolution=64,
                     train_steps=3, interrupt_at=1, train_resolution=64),
}


class CheckFailed(AssertionError):
    pass


def require(condition, message):
    if not condition:
        raise CheckFailed(message)


# ---- report ----------------------------------------------------------------------------

def device_line():
    device = comfy.model_management.get_torch_device()
    return (f"device {comfy.model_management.get_torch_device_name(device)}, "
            f"VRAM state {comfy.model_management.vram_state.name}, torch {torch.__version__}")


def dynamic_vram_line(host, flags):
    if not host_knows(host, DYNAMIC_VRAM_FLAG):
        return "dynamic VRAM: the host lacks it (no --disable-dynamic-vram in comfy/cli_args.py)"
    if DYNAMIC_VRAM_FLAG in flags:
        return "dynamic VRAM: disabled by --disable-dynamic-vram"
    import comfy.model_patcher
    dynamic = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    active = dynamic is not None and getattr(comfy.model_patcher, "CoreModelPatcher", None) is dynamic
    return f"dynamic VRAM: {'on' if active else 'off (the host did not enable it on this machine)'}"


def enable_dynamic_vram():
    """The rest of main.py's start on hosts with dynamic VRAM: ModelPatcherDynamic becomes the core
    patcher where comfy-aimdo takes the NVIDIA devices."""
    if not _dynamic_vram_requested(comfy.cli_args) or not comfy.model_management.is_nvidia():
        return
    import comfy_aimdo.control
    from comfy import memory_management, model_patcher
    devices = [d.index for d in comfy.model_management.get_all_torch_devices()]
    headroom = int(getattr(comfy.cli_args.args, "vram_headroom", 0) * 1024 ** 3)
    try:
        ready = comfy_aimdo.control.init_devices((d, headroom) for d in devices)
    except TypeError:  # older comfy-aimdo protocol
        ready = comfy_aimdo.control.init_devices(iter(devices))
    if ready:
        model_patcher.CoreModelPatcher = model_patcher.ModelPatcherDynamic
        memory_management.aimdo_enabled = True


def reset_peak_memory():
    if torch.cuda.is_available():
        try:
            torch.cuda.reset_peak_memory_stats()
        except RuntimeError:  # allocator backends without statistics
            pass


def peak_memory():
    """", peak X GiB" of GPU memory since the last reset, or the memory in use where the allocator keeps no peak."""
    if not torch.cuda.is_available():
        return ""
    try:
        return f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"
    except RuntimeError:
        free, total = torch.cuda.mem_get_info()
        return f", {(total - free) / 2 ** 30:.2f} GiB in use"


class Report:
    """Runs checks, printing one PASS/FAIL line each with wall time and peak GPU memory."""

    def __init__(self, log=print):
        self.log = log
        self.failed = []
        self.passed = []

    def run(self, name, check, *args):
        """check(*args) -> (detail, value); returns value, or None when it failed."""
        reset_peak_memory()
        start = time.perf_counter()
        error = trace = None
        try:
            detail, value = check(*args)
        except (Exception, comfy.model_management.InterruptProcessingException) as caught:
            error, trace, value = caught, traceback.format_exc(), None
            detail = str(caught) if isinstance(caught, CheckFailed) else f"{type(caught).__name__}: {caught}"
        seconds = time.perf_counter() - start
        memory = peak_memory()
        self.log(f"{'FAIL' if error else 'PASS'}  {name:<12} {seconds:6.1f} s{memory}  {detail}")
        (self.failed if error else self.passed).append(name)
        if error is not None and not isinstance(error, CheckFailed):
            self.log("      " + trace.rstrip().replace("\n", "\n      "))
        return value

    def skip(self, name, reason):
        self.log(f"FAIL  {name:<12}    0.0 s  not run: {reason}")
        self.failed.append(name)


# ---- scratch folders -------------------------------------------------------------------

@contextmanager
def scratch_folders(root):
    """Every folder the nodes read or write (checkpoints, edlora, embeddings, input, output,
    temp) inside `root`; the previous folder_paths settings come back on exit."""
    root = Path(root)
    names = ("checkpoints", "edlora", "embeddings")
    saved = {name: folder_paths.folder_names_and_paths.get(name) for name in names}
    directories = (folder_paths.get_output_directory(), folder_paths.get_input_directory(),
                   folder_paths.get_temp_directory())
    try:
        for name in names:
            (root / name).mkdir(parents=True, exist_ok=True)
            extensions = saved[name][1] if saved[name] else {".safetensors"}
            folder_paths.folder_names_and_paths[name] = ([str(root / name)], extensions)
            folder_paths.filename_list_cache.pop(name, None)
        for name, setter in (("output", folder_paths.set_output_directory), ("input", folder_paths.set_input_directory),
                             ("temp", folder_paths.set_temp_directory)):
            (root / name).mkdir(exist_ok=True)
            setter(str(root / name))
        yield root
    finally:
        for name, value in saved.items():
            if value is None:
                folder_paths.folder_names_and_paths.pop(name, None)
            else:
                folder_paths.folder_names_and_paths[name] = value
            folder_paths.filename_list_cache.pop(name, None)
        folder_paths.set_output_directory(directories[0])
        folder_paths.set_input_directory(directories[1])
        folder_paths.set_temp_directory(directories[2])


# ---- shared steps ------------------------------------------------------------------------

@dataclass
class Loaded:
    model: object
    clip: object
    vae: object
    strict: bool       # float32 weights: tolerances at float32 level


def saved_dtype(loaded):
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(loaded.model.model_dtype(), "fp32")


def tolerance(loaded):
    """Relative L2 error allowed between two computations that should agree: float32 vs half precision."""
    return 1e-4 if loaded.strict else 1e-2


def ksample(model, positive, negative, settings, seed=0):
    latent = host_nodes.EmptyLatentImage().generate(settings.size, settings.size, 1)[0]
    sampled = host_nodes.KSampler().sample(model, seed, settings.steps, settings.cfg, "euler", "normal", positive,
                                           negative, latent)[0]
    return sampled["samples"].float().cpu()


def encode(clip, text):
    return EDLoRATextEncode().encode(clip, text)[0]


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


class UNetCalls:
    """Counts calls of the diffusion model's forward."""

    def __init__(self, model):
        self.count = 0
        self.module = model.model.diffusion_model

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.count += 1

    def __exit__(self, *exc):
        self.handle.remove()


def tiny_checkpoint_state():
    """Single-file state dict of the harness's tiny UNet, 2-layer CLIP and TAESD (ldm layout)."""
    with torch.inference_mode():
        parts = (("model.", harness_models.tiny_model().model.state_dict()),
                 ("cond_stage_model.", {k.removeprefix("clip_l."): v
                                        for k, v in harness_models.tiny_clip().cond_stage_model.state_dict().items()}),
                 ("first_stage_model.", harness_models.tiny_vae().first_stage_model.state_dict()))
        return {prefix + k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
                for prefix, state in parts for k, v in state.items()}


@contextmanager
def tiny_checkpoints_detected(folder):
    """Lets the host's checkpoint detection recognise the tiny UNet (32 channels) as SD1.5 with the
    2-layer CLIP, so the tiny preset loads and reloads through the same loader nodes."""
    import json
    import comfy.supported_models
    config = Path(folder) / "tiny_clip.json"
    config.write_text(json.dumps(harness_models.TINY_CLIP))

    class TinySD15(comfy.supported_models.SD15):
        unet_config = dict(comfy.supported_models.SD15.unet_config, model_channels=harness_models.TINY_UNET[
            "model_channels"])

        def clip_target(self, state_dict=None):
            return harness_models._clip_target(str(config))

    comfy.supported_models.models.insert(0, TinySD15)
    try:
        yield
    finally:
        comfy.supported_models.models.remove(TinySD15)


def write_checkpoint(kind, path):
    if kind == "sd15":
        harness_models.write_checkpoint(str(path), seed=0)
    else:
        save_file(tiny_checkpoint_state(), str(path))


def load(settings, scratch):
    """CheckpointLoaderSimple on a seeded checkpoint of the preset's kind (generated once)."""
    name = f"gpu_check_{settings.checkpoint}.safetensors"
    path = Path(scratch) / "checkpoints" / name
    if not path.is_file():
        tmp = path.with_name("." + path.name + ".partial")
        write_checkpoint(settings.checkpoint, tmp)
        os.replace(tmp, path)
    model, clip, vae = host_nodes.CheckpointLoaderSimple().load_checkpoint(name)
    strict = model.model_dtype() == torch.float32
    return (f"{type(model).__name__}, UNet {str(model.model_dtype()).removeprefix('torch.')} on "
            f"{model.load_device}, {path.stat().st_size / 2 ** 20:.0f} MiB checkpoint"), \
        Loaded(model, clip, vae, strict)


def write_edloras(loaded):
    """Two seeded ED-LoRAs shaped for the loaded model in models/edlora: {key: (file name, EDLoRA)}."""
    unet_shapes, text_shapes = model_lora_shapes(loaded.model, loaded.clip)
    out = {}
    for index, (key, words) in enumerate(WORDS.items()):
        edlora = random_edlora(list(words), unet_shapes, text_shapes, seed=30 + index, embedding_scale=0.3,
                               text_lora_scale=0.05, name=f"gpu_check_{key}.safetensors")
        save_edlora(edlora, os.path.join(folder_paths.get_folder_paths("edlora")[0], edlora.name))
        out[key] = (edlora.name, edlora)
    return out


# ---- check: ED-LoRA, layer-wise contexts ---------------------------------------------------

def embedding_clip(clip, folder):
    """A clone of CLIP (same patches) whose tokenizer reads textual-inversion files from `folder`."""
    reference = clip.clone()
    reference.tokenizer = copy.copy(clip.tokenizer)
    for name, part in vars(clip.tokenizer).items():
        if hasattr(part, "embedding_directory"):
            part = copy.copy(part)
            part.embedding_directory = [str(folder)]
            setattr(reference.tokenizer, name, part)
    return reference


def layer_references(clip, edlora, template, folder):
    """[16] encodings [1, 77, D]: `template` with each concept word replaced by a textual-inversion
    embedding holding that word's row l, encoded by the host (independent of the plugin's binding)."""
    os.makedirs(folder, exist_ok=True)
    reference = embedding_clip(clip, folder)
    out = []
    for layer in range(LAYERS):
        text = template
        for number, word in enumerate(edlora.words):
            name = f"gpu_check_w{number}_l{layer:02d}"
            save_file({"clip_l": edlora.embeddings[word][layer][None].float().contiguous()},
                      os.path.join(folder, name + ".safetensors"))
            text = text.replace(word, f"embedding:{name}")
        out.append(reference.encode_from_tokens(reference.tokenize(text)).float().cpu())
    return out


class ContextProbe:
    """Forward pre-hooks on the 16 attn2 modules. Each batch row of the context layer l receives
    should be the positive prompt's layer-l encoding or the negative prompt's encoding (no concept
    words: the same in every layer); per call it records the worst row's error against the nearer of
    the two, and whether a row was the positive one (the host may run cond and uncond in separate
    calls when memory is short)."""

    def __init__(self, model, references, negative, tolerance):
        self.modules = [model.model.diffusion_model.get_submodule(path) for path, _ in ATTN2_MODULES]
        self.references, self.negative, self.tolerance = references, negative, tolerance
        self.worst = [[] for _ in range(LAYERS)]
        self.positive_calls = [0] * LAYERS

    def _hook(self, layer):
        def errors(rows, reference):
            reference = reference.to(rows.device).reshape(1, -1)
            return (rows - reference).norm(dim=1) / reference.norm()

        def record(module, args, kwargs):
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            rows = context.float().reshape(context.shape[0], -1)
            positive, negative = errors(rows, self.references[layer]), errors(rows, self.negative)
            self.worst[layer].append(float(torch.minimum(positive, negative).max()))
            self.positive_calls[layer] += int(bool((positive <= self.tolerance).any()))
        return record

    def __enter__(self):
        self.handles = [module.register_forward_pre_hook(self._hook(layer), with_kwargs=True)
                        for layer, module in enumerate(self.modules)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def separation(encodings):
    """Smallest relative distance between two of the encodings."""
    return min(relative_error(a, b) for i, a in enumerate(encodings) for j, b in enumerate(encodings) if i != j)


def check_edlora(loaded, edloras, settings, scratch):
    name, edlora = edloras["a"]
    model, clip = EDLoRALoader().load(loaded.model, loaded.clip, name, 0.7, 0.7)
    template = f"a photo of {' '.join(edlora.words)} on a beach"
    references = layer_references(clip, edlora, template, Path(scratch) / "embeddings")
    negative = clip.encode_from_tokens(clip.tokenize("")).float().cpu()
    tol, apart = tolerance(loaded), separation(references + [negative])
    require(apart > 10 * tol, f"the layer encodings are only {apart:.1e} apart (tolerance {tol:.0e})")
    with ContextProbe(model, references, negative, tol) as probe, UNetCalls(model) as calls:
        samples = ksample(model, encode(clip, template), encode(clip, ""), settings)
    require(torch.isfinite(samples).all(), "the sample has non-finite values")
    require(calls.count >= settings.steps, f"{calls.count} UNet calls for {settings.steps} steps")
    for layer, worst in enumerate(probe.worst):
        require(len(worst) == calls.count, f"cross-attention layer {layer} ran {len(worst)} times in {calls.count} "
                                           f"UNet calls")
        require(max(worst) <= tol, f"cross-attention layer {layer} received a context {max(worst):.1e} from both its "
                                   f"layer-{layer} encoding and the negative prompt's (tolerance {tol:.0e})")
        require(probe.positive_calls[layer] >= settings.steps,
                f"cross-attention layer {layer} saw the positive prompt in {probe.positive_calls[layer]} UNet calls "
                f"for {settings.steps} steps")
    worst = max(max(w) for w in probe.worst)
    return (f"layers 0-15 each got their own encoding in all {calls.count} UNet calls ({settings.steps} steps): "
            f"max rel err {worst:.1e} <= {tol:.0e}, encodings >= {apart:.1e} apart"), (model, clip)


# ---- checks: fusion, save and reload -----------------------------------------------------------

def expected_rows(name, concepts, settings):
    """Gram rows of a fused layer: concepts x steps x tokens of its resolution for UNet layers."""
    part, path = name.split(":", 1)
    if part == "text_encoder":
        return concepts * FUSION_PROMPTS * LAYERS * TEXT_TOKENS
    if path.endswith((".attn2.to_k", ".attn2.to_v")):
        return concepts * FUSION_PROMPTS * TEXT_TOKENS
    block = re.match(r"(down_blocks|mid_block|up_blocks)\.?(\d*)", path)
    level = {"down_blocks": lambda i: i, "mid_block": lambda i: 3, "up_blocks": lambda i: 3 - i}[block[1]](
        int(block[2] or 0))
    side = max(settings.capture_resolution // 8, 1)
    for _ in range(level):
        side = math.ceil(side / 2)
    return concepts * settings.capture_steps * side * side


def check_fusion(loaded, edloras, settings):
    concepts = None
    for name, _ in edloras.values():
        concepts = EDLoRAConcept().add(name, 1.0, 1.0, "", concepts)[0]
    model, clip, stats = GradientFuse().fuse(loaded.model, loaded.clip, concepts, "gradient", settings.capture_steps,
                                             settings.capture_resolution, 0, "all", 1e-3)
    require(stats is not None and stats.layers, "Gradient Fuse returned no statistics")
    wrong = [(name, layer.rows, expected_rows(name, len(concepts), settings)) for name, layer in stats.layers.items()
             if layer.rows != expected_rows(name, len(concepts), settings)]
    require(not wrong, f"{len(wrong)} of {len(stats.layers)} layers have other Gram row counts, e.g. "
                       f"{wrong[0][0]}: {wrong[0][1]} rows, expected {wrong[0][2]}" if wrong else "")
    unet = [n for n in stats.layers if n.startswith("unet:") and not n.endswith(("attn2.to_k", "attn2.to_v"))]
    example = max(unet, key=lambda n: expected_rows(n, 1, settings))
    return (f"Gram rows of all {len(stats.layers)} layers as expected, e.g. {example.split(':')[1]}: "
            f"{len(concepts)} concepts x {settings.capture_steps} steps x "
            f"{expected_rows(example, 1, settings) // settings.capture_steps} tokens = {stats.layers[example].rows}"), \
        (model, clip, stats)


def check_save_reload(loaded, fused, settings):
    model, clip, stats = fused
    prompt = f"photo of a {' '.join(WORDS['a'])} and a {' '.join(WORDS['b'])}"
    before = ksample(model, encode(clip, prompt), encode(clip, ""), settings)
    existing = set(folder_paths.get_filename_list("checkpoints"))
    # saved in the precision the model runs in, so the round trip itself is what is compared (the default,
    # the input file's dtype, is what test_fused_model checks: a float16 file loaded as float32 on a CPU rounds)
    SaveFusedModel().save(model, clip, loaded.vae, "gpu_check_fused", stats, saved_dtype(loaded))
    written = sorted(set(folder_paths.get_filename_list("checkpoints")) - existing)
    require(len(written) == 1, f"Save Fused Model wrote {written or 'no checkpoint'} into models/checkpoints")
    model2, clip2, _, stats2 = LoadFusedModel().load(written[0])
    after = ksample(model2, encode(clip2, prompt), encode(clip2, ""), settings)
    plain = "photo of a cat"
    base = ksample(loaded.model, encode(loaded.clip, plain), encode(loaded.clip, ""), settings)
    reloaded_plain = ksample(model2, encode(clip2, plain), encode(clip2, ""), settings)
    tol, error, change = tolerance(loaded), relative_error(after, before), relative_error(reloaded_plain, base)
    require(stats2 is not None and {n: s.rows for n, s in stats2.layers.items()} == {
        n: s.rows for n, s in stats.layers.items()}, "the reloaded fusion statistics differ from the saved ones")
    require(error <= tol, f"the reloaded model's sample is {error:.1e} from the one before saving "
                          f"(tolerance {tol:.0e})")
    require(change > tol, f"the reloaded model samples like the base model ({change:.1e} apart, tolerance {tol:.0e}): "
                          f"the fusion was not saved, or it is too weak for this check to tell")
    return (f"{written[0]}: sample {error:.1e} from the one before saving (tolerance {tol:.0e}); base model's "
            f"{change:.1e} away"), None


# ---- check: training, interrupt, resume ----------------------------------------------------

def train_inputs(dataset, masks, settings, output_name, **overrides):
    inputs = dict(
        dataset_folder=str(dataset), placeholder=PLACEHOLDER, concept_word_1="<gct1>", concept_word_2="<gct2>",
        initializer_1="<rand-0.013>", initializer_2="cat", steps=settings.train_steps, repeats=1, batch_size=1,
        resolution=settings.train_resolution, lr_embedding=1e-3, lr_text_encoder=1e-5, lr_unet=1e-4, rank=4,
        noise_offset=0.01, masked_loss=True, attn_reg_weight=0.01, reg_full_identity=False, emb_norm_threshold=0.55,
        caption_template="human", shuffle_caption=True, seed=5, save_every=0, output_name=output_name,
        preview_every=0, preview_prompt=f"a photo of {PLACEHOLDER}", preview_steps=1, gradient_checkpointing=False,
        precision="fp32", also_save_pth=False, masks_folder=str(masks), resume="")
    inputs.update(overrides)
    return inputs


@contextmanager
def interrupt_at_step(step):
    """Raises the host's interrupt (nodes.interrupt_processing, what POST /interrupt calls) once a
    progress bar reports `step`; the flag is cleared on exit."""
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, *args, **kwargs):
        if value == step:
            host_nodes.interrupt_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        host_nodes.interrupt_processing(False)


def train(loaded, inputs):
    result = EDLoRATrain().train(loaded.model, loaded.clip, loaded.vae, **inputs)
    name = result["result"][0] if isinstance(result, dict) else result[0]
    return load_file(os.path.join(folder_paths.get_folder_paths("edlora")[0], name))


def file_difference(a, b):
    """Largest per-tensor max|a − b| / max|b| of two ED-LoRA files (0.0: bitwise equal)."""
    require(a.keys() == b.keys(), "the resumed ED-LoRA has other tensors than the uninterrupted one")
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)) for k in a)


def check_train(loaded, settings, scratch):
    dataset, masks = write_concept_dataset(Path(scratch) / "input" / "gpu_check_cat", "cat", count=2,
                                           size=settings.train_resolution)
    uninterrupted = train(loaded, train_inputs(dataset, masks, settings, "gpu_check_full"))
    inputs = train_inputs(dataset, masks, settings, "gpu_check_resumed")
    interrupted = False
    with interrupt_at_step(settings.interrupt_at):
        try:
            train(loaded, inputs)
        except comfy.model_management.InterruptProcessingException:
            interrupted = True
    require(interrupted, f"EDLoRA Train did not stop when interrupted at step {settings.interrupt_at}")
    states = sorted(glob.glob(os.path.join(folder_paths.get_output_directory(), "edlora_training",
                                           "gpu_check_resumed", "state-*.safetensors")))
    require(states, "the interrupted EDLoRA Train saved no resumable state")
    resumed = train(loaded, {**inputs, "resume": "latest"})
    difference = file_difference(resumed, uninterrupted)
    detail = (f"{settings.train_steps} steps; interrupted at step {settings.interrupt_at}, saved "
              f"{Path(states[-1]).name}, resumed: ")
    if difference == 0.0:
        return detail + "bitwise equal to the uninterrupted run", None
    # on a GPU some kernels are not bitwise reproducible: compare with a second uninterrupted run
    noise = file_difference(train(loaded, train_inputs(dataset, masks, settings, "gpu_check_full2")), uninterrupted)
    require(difference <= 4 * noise, f"the resumed ED-LoRA differs from the uninterrupted one by {difference:.1e} "
                                     f"(two uninterrupted runs differ by {noise:.1e})")
    return detail + f"{difference:.1e} from the uninterrupted run (run-to-run noise {noise:.1e})", None


# ---- check: regional sampling ------------------------------------------------------------------

def plain_attention(q, k, v, heads):
    """Scaled dot-product attention of [B, N, heads*d] projections (reference for the patch's global output)."""
    def split(x):
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


class CountingPatch:
    """Wraps an attn2 replace patch: records, per cross-attention layer, the sampling steps (by sigma)
    in which it changed the output against plain attention to the global context."""

    def __init__(self, patch, fired, steps, tolerance):
        self.patch, self.fired, self.steps, self.tolerance = patch, fired, steps, tolerance

    def __call__(self, q, k, v, extra_options):
        out = self.patch(q, k, v, extra_options)
        plain = plain_attention(q.float(), k.float(), v.float(), extra_options["n_heads"])
        sigma = float(extra_options["sigmas"].flatten()[0])
        self.steps.add(sigma)
        if relative_error(out, plain) > self.tolerance:
            self.fired.setdefault(extra_options["transformer_index"], set()).add(sigma)
        return out


def attn2_replace_patches(model):
    return dict(model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {}))


def counted(model, before, fired, steps, tol):
    """A clone of `model` whose attn2 replace patches that are not in `before` are counted."""
    clone = model.clone()
    for key, patch in attn2_replace_patches(model).items():
        if before.get(key) is not patch:
            clone.set_model_attn2_replace(CountingPatch(patch, fired, steps, tol), *key)
    return clone


def check_regional(loaded, edlora_pair, settings):
    model, clip = edlora_pair
    regions = None
    for prompt, box in ((f"a {' '.join(WORDS['a'])}, standing", "0, 0, 0.5, 1"), ("a red ball", "0.5, 0, 1, 1")):
        regions = RegionPrompt().add_region(clip, prompt, "", box, "normalized", settings.size, settings.size, 1.0,
                                            regions or ())[0]
    regional_model, positive, negative = ApplyRegions().apply(model, encode(clip, "two things in a park"),
                                                              encode(clip, ""), regions)
    fired, steps = {}, set()
    counting = counted(regional_model, attn2_replace_patches(model), fired, steps, tolerance(loaded))
    with UNetCalls(counting) as calls:
        samples = ksample(counting, positive, negative, settings)
    require(torch.isfinite(samples).all(), "the regional sample has non-finite values")
    require(steps, "Apply Regions installed no attn2 replace patch (nothing was counted)")
    require(len(steps) == settings.steps, f"the patches saw {len(steps)} sampling steps of {settings.steps}")
    for layer in range(LAYERS):
        require(fired.get(layer, set()) == steps, f"cross-attention layer {layer}: the region patch changed the output "
                                                  f"in {len(fired.get(layer, ()))} of {len(steps)} steps")
    return f"the region patch changed all 16 layers in each of {len(steps)} steps ({calls.count} UNet calls)", None


# ---- driver --------------------------------------------------------------------------------------

def run_checks(settings, scratch, log=print):
    """All checks on the current host and device, files in `scratch`; returns the Report."""
    report = Report(log)
    log(device_line())
    with scratch_folders(scratch), torch.inference_mode(), ExitStack() as stack:
        if settings.checkpoint == "tiny":
            stack.enter_context(tiny_checkpoints_detected(scratch))
        loaded = report.run("load", load, settings, scratch)
        if loaded is None:
            for name in ("edlora", "fusion", "save-reload", "train", "regional"):
                report.skip(name, "load failed")
            return report
        edloras = write_edloras(loaded)
        pair = report.run("edlora", check_edlora, loaded, edloras, settings, scratch)
        fused = report.run("fusion", check_fusion, loaded, edloras, settings)
        if fused is None:
            report.skip("save-reload", "fusion failed")
        else:
            report.run("save-reload", check_save_reload, loaded, fused, settings)
        report.run("train", check_train, loaded, settings, scratch)
        if pair is None:
            report.skip("regional", "EDLoRA Loader failed")
        else:
            report.run("regional", check_regional, loaded, pair, settings)
    return report


def main(options, flags):
    host = Path(options.host).resolve()
    print(f"gpu_check: host {host} ({host_version(host)}), flags {' '.join(flags) or '(defaults)'}, "
          f"preset {options.preset}")
    enable_dynamic_vram()
    print(dynamic_vram_line(host, flags))
    start = time.perf_counter()
    report = run_checks(PRESETS[options.preset], options.scratch)
    total = len(report.passed) + len(report.failed)
    print(f"gpu_check: {len(report.passed)}/{total} passed in {time.perf_counter() - start:.1f} s"
          f"{'' if not report.failed else ' - FAILED: ' + ', '.join(report.failed)}")
    return 1 if report.failed else 0


def host_version(host):
    version = Path(host) / "comfyui_version.py"
    if version.is_file():
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version.read_text(encoding="utf-8"))
        if found:
            return f"ComfyUI {found[1]}"
    return "ComfyUI without comfyui_version.py (2024)"
