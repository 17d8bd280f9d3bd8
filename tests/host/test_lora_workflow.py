"""workflows/fuse_two_loras*.json through a real, headless ComfyUI server: two ordinary kohya LoRAs
(seeded, shaped for the demo checkpoint, harness.lora_fixtures.write_demo_loras) chained through LoRA
Concept, fused by Gradient Fuse, saved by Save Fused Model with their trigger words, and sampled with
one Region Prompt per character. Tiny run: 1 capture step at 64 px, 2 sampling steps at 128x64."""
import json

import pytest
from safetensors import safe_open

from comfyui_mixofshow.harness import demo_models, workflows
from comfyui_mixofshow.harness.lora_fixtures import DEMO_LORAS, write_demo_loras
from comfyui_mixofshow.mixofshow_core.fusion_stats import load_fusion_stats

from .server_runs import assert_ui_matches_api, checked_pixels, only_image, prepared_server, running, workflow_pair

PREFIX = "mixofshow_test_two_loras"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    checkpoint, cat = demo_models.ensure_demo_models()  # cached in .host/run, shared with the demo
    loras = write_demo_loras(checkpoint, demo_models.RUN_DIR / "fixtures" / "loras")
    server = prepared_server(tmp_path_factory.mktemp("comfy-loras"),
                             [("checkpoints", checkpoint), ("edlora", cat)] + [("loras", path) for path in loras])
    try:
        with running(server) as client:
            yield server, client
    finally:
        for path in (demo_models.host_models_dir(server) / "checkpoints").glob(f"{PREFIX}_*_.*"):
            path.unlink()


def test_two_ordinary_loras_fuse_and_sample_with_one_region_each(run):
    server, client = run
    _, api = workflow_pair("fuse_two_loras")
    graph = workflows.set_sampling(api, steps=2, image_prefix=PREFIX)
    graph[workflows.only_node(graph, "MixOfShowGradientFuse")]["inputs"]["capture_steps"] = 1
    graph[workflows.only_node(graph, "MixOfShowSaveFusedModel")]["inputs"]["filename_prefix"] = PREFIX
    entry = client.run(graph, timeout=900)
    info, png = only_image(client, entry)
    assert info["filename"].startswith(PREFIX)
    checked_pixels(png, (128, 64))

    checkpoint, stats = (demo_models.host_models_dir(server) / p
                         for p in workflows.reported_files(entry, graph, "MixOfShowSaveFusedModel"))
    triggers = [{"trigger": trigger, "source": name} for name, trigger, _ in DEMO_LORAS]
    with safe_open(str(checkpoint), framework="pt") as f:
        assert json.loads(f.metadata()["mixofshow.triggers"]) == triggers
        assert json.loads(f.metadata()["mixofshow.concepts"]) == []  # no embedding words
    records = load_fusion_stats(str(stats)).concepts
    assert [(r["name"], r["triggers"], r["class_word"]) for r in records] == [
        (name, [trigger], cls) for (name, trigger, _), cls in zip(DEMO_LORAS, ("woman", "man"))]


def test_an_edlora_and_two_ordinary_loras_fuse_in_one_list_and_reload(run):
    """Mixed list through the server: EDLoRA Concept -> LoRA Concept -> LoRA Concept; the saved
    checkpoint carries the ED-LoRA's layer-wise words and the LoRAs' triggers, and Load Fused Model
    samples a prompt with both kinds of words."""
    server, client = run
    _, api = workflow_pair("fuse_two_loras")
    graph = workflows.set_sampling(api, steps=2, image_prefix=PREFIX)
    fuse = graph[workflows.only_node(graph, "MixOfShowGradientFuse")]["inputs"]
    fuse["capture_steps"] = 1
    graph[workflows.only_node(graph, "MixOfShowSaveFusedModel")]["inputs"]["filename_prefix"] = PREFIX + "_mixed"
    first = next(k for k, node in graph.items()
                 if node["class_type"] == "MixOfShowLoRAConcept" and "concepts" not in node["inputs"])
    graph["edlora_concept"] = {"class_type": "MixOfShowEDLoRAConcept",
                               "inputs": {"edlora_name": demo_models.DEMO_EDLORA, "unet_alpha": 1.0,
                                          "text_encoder_alpha": 1.0, "rename": ""}}
    graph[first]["inputs"]["concepts"] = ["edlora_concept", 0]
    entry = client.run(graph, timeout=900)
    checked_pixels(only_image(client, entry)[1], (128, 64))

    checkpoint = demo_models.host_models_dir(server) / workflows.reported_files(
        entry, graph, "MixOfShowSaveFusedModel")[0]
    with safe_open(str(checkpoint), framework="pt") as f:
        assert [c["word"] for c in json.loads(f.metadata()["mixofshow.concepts"])] == ["<cat1>", "<cat2>"]
        assert [t["trigger"] for t in json.loads(f.metadata()["mixofshow.triggers"])] == [
            trigger for _, trigger, _ in DEMO_LORAS]
    ckpt_name = checkpoint.relative_to(demo_models.host_models_dir(server) / "checkpoints").as_posix()
    text = f"a photo of <cat1> <cat2> and {DEMO_LORAS[0][1]}"
    loaded = {
        "l1": {"class_type": "MixOfShowLoadFusedModel", "inputs": {"ckpt_name": ckpt_name}},
        "l2": {"class_type": "MixOfShowEDLoRATextEncode", "inputs": {"clip": ["l1", 1], "text": text}},
        "l3": {"class_type": "MixOfShowEDLoRATextEncode", "inputs": {"clip": ["l1", 1], "text": ""}},
        "l4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "l5": {"class_type": "KSampler", "inputs": {"model": ["l1", 0], "positive": ["l2", 0], "negative": ["l3", 0],
                                                    "latent_image": ["l4", 0], "seed": 0, "steps": 2, "cfg": 7.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "l6": {"class_type": "VAEDecode", "inputs": {"samples": ["l5", 0], "vae": ["l1", 2]}},
        "l7": {"class_type": "SaveImage", "inputs": {"images": ["l6", 0], "filename_prefix": PREFIX + "_loaded"}},
    }
    checked_pixels(only_image(client, client.run(loaded, timeout=300))[1], (64, 64))


def test_ui_workflow_is_consistent_with_the_api_workflow(run):
    _, client = run
    assert_ui_matches_api(*workflow_pair("fuse_two_loras"), client.object_info())
