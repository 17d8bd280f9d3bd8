"""The demo's models: a seeded random SD1.5-topology checkpoint, random ED-LoRAs shaped for it,
a random keypose ControlNet, and links to a user's real model files in a run folder.

Generating needs ComfyUI on sys.path (harness.host adds it)."""
import gc
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / ".host" / "run"
DEMO_CHECKPOINT = "mixofshow_demo_sd15.safetensors"
DEMO_SDXL_CHECKPOINT = "mixofshow_tiny_sdxl.safetensors"  # sdxl_models.write_sdxl_checkpoint, the SDXL workflows' default
# Random stand-ins for the ED-LoRAs the demo trains, under the names the demo gives them (the shipped
# workflows default to those), kept apart from the demo's own files in run_dir/fixtures/edlora.
FIXTURE_EDLORA_DIR = Path("fixtures") / "edlora"
DEMO_EDLORA = "mixofshow_demo_trained_cat.safetensors"
DEMO_WORDS = ("<cat1>", "<cat2>")
DEMO_SEED = 0
# further random concepts: (name, seed); files mixofshow_demo_trained_<name>.safetensors
DEMO_CONCEPTS = (("dog", 20), ("owl", 22))
DEMO_CONTROLNET = "mixofshow_demo_keypose_controlnet.safetensors"


def ensure_demo_checkpoint(run_dir=RUN_DIR, log=print):
    """Generates (if missing) the random demo checkpoint in run_dir/models; returns its path."""
    checkpoint = Path(run_dir) / "models" / "checkpoints" / DEMO_CHECKPOINT
    if checkpoint.is_file():
        return checkpoint
    from . import host
    host.add_host_to_path(cpu=True)
    import torch
    from . import models
    log(f"Generating the random demo checkpoint {checkpoint} (about 480 MB) ...")
    start = time.perf_counter()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name("." + checkpoint.name + ".partial")
    with torch.inference_mode():  # building the host's CLIP needs it (harness.md §4)
        models.write_checkpoint(str(tmp), seed=DEMO_SEED)
    os.replace(tmp, checkpoint)
    (Path(run_dir) / FIXTURE_EDLORA_DIR / DEMO_EDLORA).unlink(missing_ok=True)  # shaped for the old file
    log(f"  done in {time.perf_counter() - start:.1f} s")
    return checkpoint


def ensure_sdxl_checkpoint(run_dir=RUN_DIR, log=print):
    """Generates (if missing) the random checkpoint the host detects as SDXL in run_dir/models; returns its path."""
    checkpoint = Path(run_dir) / "models" / "checkpoints" / DEMO_SDXL_CHECKPOINT
    if checkpoint.is_file():
        return checkpoint
    from . import host
    host.add_host_to_path(cpu=True)
    import torch
    from . import sdxl_models
    log(f"Generating the random SDXL checkpoint {checkpoint} (about 1.9 GB: full-size clip_l and clip_g) ...")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name("." + checkpoint.name + ".partial")
    with torch.inference_mode():
        sdxl_models.write_sdxl_checkpoint(str(tmp), seed=DEMO_SEED)
    os.replace(tmp, checkpoint)
    return checkpoint


def ensure_demo_models(run_dir=RUN_DIR, log=print):
    """Generates (if missing) the random demo checkpoint and demo ED-LoRA in run_dir/models;
    returns their paths. Loads ComfyUI in this process (on the CPU) to shape the ED-LoRA."""
    checkpoint = ensure_demo_checkpoint(run_dir, log)
    edlora = Path(run_dir) / FIXTURE_EDLORA_DIR / DEMO_EDLORA
    if edlora.is_file():
        return checkpoint, edlora
    log(f"Generating the random demo ED-LoRA {edlora} (words {' '.join(DEMO_WORDS)}) ...")
    from . import host
    host.add_host_to_path(cpu=True)
    import comfy.sd
    import torch
    from .edlora_fixtures import model_lora_shapes, random_edlora
    from ..mixofshow_core.edlora_format import save_edlora
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(checkpoint), output_vae=False, output_clip=True, embedding_directory=None)
        unet_shapes, text_shapes = model_lora_shapes(model, clip)
    del model, clip
    gc.collect()
    edlora.parent.mkdir(parents=True, exist_ok=True)
    save_edlora(random_edlora(list(DEMO_WORDS), unet_shapes, text_shapes, seed=DEMO_SEED + 10,
                              name=DEMO_EDLORA), str(edlora))
    return checkpoint, edlora


def demo_edlora_name(animal):
    """The file name the demo gives its trained ED-LoRA of <animal1> <animal2>."""
    return f"mixofshow_demo_trained_{animal}.safetensors"


def write_demo_concept(cat_path, name, seed, folder):
    """A random ED-LoRA for <name1> <name2> on the layers (and shapes) of the demo ED-LoRA, in
    folder (if missing); returns its path."""
    from .edlora_fixtures import random_edlora
    from ..mixofshow_core.edlora_format import load_edlora, save_edlora
    path = Path(folder) / demo_edlora_name(name)
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
    folder = Path(run_dir) / FIXTURE_EDLORA_DIR
    return checkpoint, [cat] + [write_demo_concept(cat, name, seed, folder) for name, seed in DEMO_CONCEPTS]


def ensure_demo_controlnet(run_dir=RUN_DIR):
    """A seeded random keypose ControlNet shaped for the demo UNet (ComfyUI's T2I-Adapter loader
    cannot build one for the demo UNet's 320 channels at every level); returns its path."""
    path = Path(run_dir) / "models" / "controlnet" / DEMO_CONTROLNET
    if not path.is_file():
        from . import host
        host.add_host_to_path(cpu=True)
        from . import models
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


def host_models_dir(server):
    """The models folder Save Fused Model writes under: the first checkpoints folder ComfyUI
    registers is its own models/checkpoints (the run folder's model folders are extra paths)."""
    return Path(server.host_dir) / "models"
