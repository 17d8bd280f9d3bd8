"""End to end through a real, headless ComfyUI server (harness/server.py) and its HTTP API.

One server per module, in a temporary run folder, with the demo checkpoint and demo ED-LoRA
(generated once into .host/run, as scripts/demo.sh does) and a few malformed ED-LoRA files.
"""
import argparse
import json

import numpy as np
import pytest
import torch

from comfyui_mixofshow.harness import demo_models, models, workflows
from comfyui_mixofshow.harness import server as harness_server
from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.mixofshow_core.edlora_format import (load_edlora, save_edlora, save_edlora_original,
                                                            to_original_dict)

from .node_specs import combo_options
from .server_runs import (assert_ui_matches_api, checked_pixels, pixels, prepared_server, run_image, running,
                          workflow_pair)

SIZE = 64


def _write_bad_files(folder, good_edlora):
    """{file name: (fragments the execution error must contain)} for malformed ED-LoRAs."""
    cases = {}
    original = folder / "broken_truncated.pth"
    save_edlora_original(good_edlora, str(original))
    data = original.read_bytes()
    original.write_bytes(data[:len(data) // 2])
    cases[original.name] = ("not a plain tensor checkpoint", "truncated")

    torch.save({"params": argparse.Namespace(new_concept_embedding={})}, folder / "broken_pickle.pth")
    cases["broken_pickle.pth"] = ("not a plain tensor checkpoint", "objects other than tensors")

    params = to_original_dict(good_edlora)
    params["params"]["new_concept_embedding"]["<cat1>"] = "a string, not a tensor"
    torch.save(params, folder / "broken_not_tensor.pth")
    cases["broken_not_tensor.pth"] = ("new_concept_embedding", "holds a str, not a tensor")

    params = to_original_dict(good_edlora)
    params["params"]["new_concept_embedding"] = {"<cat1>": torch.randn(16, 1024)}
    torch.save(params, folder / "broken_sdxl_embedding.pth")
    cases["broken_sdxl_embedding.pth"] = ("<cat1>", "[16, 1024]", "expected [16, 768]")

    with torch.inference_mode():  # LoRA shapes of another SD1.5-topology model (32-channel UNet)
        unet_shapes, text_shapes = model_lora_shapes(models.tiny_model(), models.tiny_clip())
    other = random_edlora(["<dog1>", "<dog2>"], unet_shapes, text_shapes, seed=5,
                          name="broken_other_model.safetensors")
    save_edlora(other, str(folder / other.name))
    cases[other.name] = ("in the file but", "in the model", "made for another base model")
    return cases


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(server, client, bad-file cases): a server in a temporary run folder."""
    checkpoint, edlora = demo_models.ensure_demo_models()  # cached in .host/run, shared with the demo
    server = prepared_server(tmp_path_factory.mktemp("comfy-run"), [("checkpoints", checkpoint), ("edlora", edlora)])
    cases = _write_bad_files(server.models_dir("edlora"), load_edlora(str(edlora)))
    with running(server) as client:
        yield server, client, cases


def demo_prompt(**changes):
    """The API workflow with the demo files; `changes` = {input name: value} on any node."""
    graph = workflows.build_prompt(workflows.load_workflow(), demo_models.DEMO_CHECKPOINT, [demo_models.DEMO_EDLORA])
    for node in graph.values():
        for key, value in changes.items():
            if key in node["inputs"]:
                node["inputs"][key] = value
    return graph


def test_workflow_produces_image(run):
    server, client, _ = run
    info, png = run_image(client, demo_prompt(seed=1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = checked_pixels(png, (SIZE, SIZE))
    assert image.shape == (SIZE, SIZE, 3)
    saved = server.run_dir / "output" / info.get("subfolder", "") / info["filename"]
    assert info["filename"].startswith("mixofshow_demo") and saved.read_bytes() == png

    # the ED-LoRA changes the image: the same workflow with both alphas at 0 differs
    _, plain = run_image(client, demo_prompt(seed=1, unet_alpha=0.0, text_encoder_alpha=0.0))
    assert np.abs(pixels(plain) - image).max() > 1e-3


def test_object_info_lists_plugin_nodes(run):
    _, client, _ = run
    info = client.object_info()
    for name, display in (("MixOfShowEDLoRALoader", "EDLoRA Loader"),
                          ("MixOfShowEDLoRATextEncode", "EDLoRA Text Encode")):
        node = info[name]
        assert node["display_name"] == display
        assert node["category"] == "mixofshow"
        assert len(node["description"]) > 40
        for input_name, spec in node["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert info["MixOfShowEDLoRALoader"]["output"] == ["MODEL", "CLIP"]
    assert info["MixOfShowEDLoRATextEncode"]["output"] == ["CONDITIONING"]
    edlora_names = combo_options(info["MixOfShowEDLoRALoader"]["input"]["required"]["edlora_name"])
    assert demo_models.DEMO_EDLORA in edlora_names
    assert demo_models.DEMO_CHECKPOINT in combo_options(info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"])


def renamed(graph, prefix, keep=("1",)):
    """The graph under fresh node ids (except `keep`)."""
    ids = {k: k if k in keep else prefix + k for k in graph}
    out = {}
    for node_id, node in graph.items():
        node = json.loads(json.dumps(node))
        for key, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in ids:
                node["inputs"][key] = [ids[value[0]], value[1]]
        out[ids[node_id]] = node
    return out


def assert_fails_naming(client, graph, name, fragments):
    with pytest.raises(harness_server.ComfyError) as failure:
        client.run(graph, timeout=120)
    message = harness_server.execution_errors(failure.value.details)
    assert "MixOfShowEDLoRALoader" in message, message
    assert name in message, message
    for fragment in fragments:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"


def test_malformed_edlora_files_fail_cleanly(run):
    _, client, cases = run
    good = demo_prompt(seed=200, steps=2)
    run_image(client, good)
    for index, (name, fragments) in enumerate(sorted(cases.items())):
        # The bad chain runs beside the unchanged good graph (the 2024 host drops the cached
        # outputs of node ids a prompt lacks), so the good graph below only samples again.
        bad = renamed(demo_prompt(edlora_name=name, steps=2), f"bad{index}_")
        assert_fails_naming(client, {**good, **bad}, name, fragments)
        good = demo_prompt(seed=201 + index, steps=2)
        _, png = run_image(client, good)
        assert pixels(png).std() > 1e-3
    # as in the UI: the same loader node gets a bad file, then the good one again (re-runs it)
    name = "broken_truncated.pth"
    assert_fails_naming(client, demo_prompt(edlora_name=name, steps=2), name, cases[name])
    _, png = run_image(client, demo_prompt(seed=300, steps=2))
    assert pixels(png).std() > 1e-3


def test_unknown_edlora_name_is_rejected_before_running(run):
    _, client, _ = run
    with pytest.raises(harness_server.ComfyError) as failure:
        client.queue(demo_prompt(edlora_name="does_not_exist.safetensors"))
    assert "edlora_name" in str(failure.value) and "does_not_exist.safetensors" in str(failure.value)


def test_ui_workflow_is_consistent_with_the_api_workflow(run):
    _, client, _ = run
    assert_ui_matches_api(*workflow_pair("edlora_txt2img"), client.object_info())
