"""The fusion workflow (workflows/fuse_three_concepts*.json) through a real, headless ComfyUI
server (harness/server.py) and its HTTP API: three demo ED-LoRAs fused by Gradient Fuse, saved
by Save Fused Model (checkpoint + .fusionstats), sampled with two concepts in one prompt; then
the saved checkpoint loaded by Load Fused Model in a second prompt.

The demo checkpoint and <cat1> <cat2> ED-LoRA are generated once into .host/run (as
scripts/demo.sh does); <dog1> <dog2> and <owl1> <owl2> are written as the demo writes them.
Tiny run: the chain cut to two concepts (<cat1> <cat2>, <dog1> <dog2>: the ones the prompt
uses), 1 capture step at 64 px, 2 sampling steps at 64x64. Save Fused Model writes into the
host's own models/checkpoints (ComfyUI's first checkpoints folder); the fixture removes the
test's files from there.
"""
import json

import numpy as np
import pytest
from safetensors import safe_open

from comfyui_mixofshow.harness import demo_models, workflows
from comfyui_mixofshow.mixofshow_core.fusion_stats import load_fusion_stats

from .node_specs import combo_options
from .server_runs import (assert_ui_matches_api, checked_pixels, only_image, prepared_server, run_image, running,
                          workflow_pair)

SIZE, STEPS = 64, 2
WORDS = ["<cat1>", "<cat2>", "<dog1>", "<dog2>"]
PREFIX = "mixofshow_test_fused"
PROMPT = "a photo of <cat1> <cat2> and <dog1> <dog2> in a garden"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(server, client, ED-LoRA names): a server in a temporary run folder."""
    checkpoint, cat = demo_models.ensure_demo_models()  # cached in .host/run, shared with the demo
    server = prepared_server(tmp_path_factory.mktemp("comfy-fusion"), [("checkpoints", checkpoint), ("edlora", cat)])
    names = [cat.name] + [demo_models.write_demo_concept(cat, name, seed, server.models_dir("edlora")).name
                          for name, seed in demo_models.DEMO_CONCEPTS]
    try:
        with running(server) as client:
            yield server, client, names
    finally:
        for path in (demo_models.host_models_dir(server) / "checkpoints").glob(f"{PREFIX}_*_.*"):
            path.unlink()


def fusion_graph(names):
    return workflows.build_fusion_prompt(workflows.load_workflow(workflows.FUSION_WORKFLOW),
                                         demo_models.DEMO_CHECKPOINT, names[:2], steps=STEPS, capture_steps=1,
                                         capture_resolution=64, filename_prefix=PREFIX, image_prefix=PREFIX)


def test_shipped_workflow_fuses_the_three_demo_concepts():
    graph = workflows.load_workflow(workflows.FUSION_WORKFLOW)
    names = [graph[k]["inputs"]["edlora_name"] for k in workflows.concept_chain(graph)]
    assert names == [demo_models.DEMO_EDLORA] + [demo_models.demo_edlora_name(n)
                                                 for n, _ in demo_models.DEMO_CONCEPTS]
    assert workflows.positive_text(graph) == PROMPT
    fuse = graph[workflows.only_node(graph, "MixOfShowGradientFuse")]["inputs"]
    assert fuse["method"] == "gradient" and fuse["capture_steps"] <= 4 and fuse["capture_resolution"] == 64
    save = graph[workflows.only_node(graph, "MixOfShowSaveFusedModel")]["inputs"]
    assert save["model"] == [workflows.only_node(graph, "MixOfShowGradientFuse"), 0] and "fusion_stats" in save
    # the chain is cut or extended to the number of files
    for count in (1, 2, 5):
        built = workflows.build_fusion_prompt(graph, "x.safetensors", [f"e{i}.safetensors" for i in range(count)])
        chain = workflows.concept_chain(built)
        assert [built[k]["inputs"]["edlora_name"] for k in chain] == [f"e{i}.safetensors" for i in range(count)]
        assert sum(n["class_type"] == "MixOfShowEDLoRAConcept" for n in built.values()) == count


def test_fusion_workflow_saves_a_checkpoint_that_loads(run):
    server, client, names = run
    graph = fusion_graph(names)
    entry = client.run(graph, timeout=600)
    info, png = only_image(client, entry)
    assert info["filename"].startswith(PREFIX)
    fused_image = checked_pixels(png, (SIZE, SIZE))

    saved = workflows.reported_files(entry, graph, "MixOfShowSaveFusedModel")
    assert len(saved) == 2, saved
    checkpoint = demo_models.host_models_dir(server) / saved[0]
    stats = demo_models.host_models_dir(server) / saved[1]
    assert checkpoint.name.startswith(PREFIX + "_") and checkpoint.suffix == ".safetensors"
    assert stats == checkpoint.with_suffix(".fusionstats")
    assert checkpoint.is_file() and stats.is_file()
    assert not list(checkpoint.parent.glob(".*partial*")) and not list(checkpoint.parent.glob("*.tmp"))
    with safe_open(str(checkpoint), framework="pt") as f:
        concepts = json.loads(f.metadata()["mixofshow.concepts"])
        assert [c["word"] for c in concepts] == WORDS
        for word in WORDS:
            assert list(f.get_slice(demo_key(word)).get_shape()) == [16, 768]
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())
    assert load_fusion_stats(str(stats)).words == WORDS

    # a second prompt: the saved checkpoint through Load Fused Model, same prompt and seed
    ckpt_name = checkpoint.relative_to(demo_models.host_models_dir(server) / "checkpoints").as_posix()
    info_list = client.object_info("MixOfShowLoadFusedModel")["MixOfShowLoadFusedModel"]
    assert ckpt_name in combo_options(info_list["input"]["required"]["ckpt_name"])
    assert info_list["output"] == ["MODEL", "CLIP", "VAE", "FUSION_STATS"]
    sampler = graph[workflows.only_node(graph, "KSampler")]["inputs"]
    loaded = {
        "f1": {"class_type": "MixOfShowLoadFusedModel", "inputs": {"ckpt_name": ckpt_name}},
        "f2": {"class_type": "MixOfShowEDLoRATextEncode", "inputs": {"clip": ["f1", 1], "text": PROMPT}},
        "f3": {"class_type": "MixOfShowEDLoRATextEncode",
               "inputs": {"clip": ["f1", 1], "text": graph[sampler["negative"][0]]["inputs"]["text"]}},
        "f4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "f5": {"class_type": "KSampler", "inputs": {**sampler, "model": ["f1", 0], "positive": ["f2", 0],
                                                    "negative": ["f3", 0], "latent_image": ["f4", 0]}},
        "f6": {"class_type": "VAEDecode", "inputs": {"samples": ["f5", 0], "vae": ["f1", 2]}},
        "f7": {"class_type": "SaveImage", "inputs": {"images": ["f6", 0], "filename_prefix": "mixofshow_test_loaded"}},
    }
    info, png = run_image(client, loaded, timeout=300)
    assert info["filename"].startswith("mixofshow_test_loaded")
    image = checked_pixels(png, (SIZE, SIZE))
    # the reloaded model samples what the in-memory fused model sampled (8-bit PNGs)
    assert np.abs(image - fused_image).max() <= 2 / 255, np.abs(image - fused_image).max()


def demo_key(word):
    return "mixofshow.embedding." + word


def test_ui_workflow_is_consistent_with_the_api_workflow(run):
    _, client, _ = run
    assert_ui_matches_api(*workflow_pair("fuse_three_concepts"), client.object_info())
