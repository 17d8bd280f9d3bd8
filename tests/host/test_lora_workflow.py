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
    checkpoint = demo_models.ensure_demo_checkpoint()  # cached in .host/run, shared with the demo
    loras = write_demo_loras(checkpoint, demo_models.RUN_DIR / "fixtures" / "loras")
    server = prepared_server(tmp_path_factory.mktemp("comfy-loras"),
                             [("checkpoints", checkpoint)] + [("loras", path) for path in loras])
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


def test_ui_workflow_is_consistent_with_the_api_workflow(run):
    _, client = run
    assert_ui_matches_api(*workflow_pair("fuse_two_loras"), client.object_info())
