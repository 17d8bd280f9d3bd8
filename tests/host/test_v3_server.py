"""The plugin's nodes through a real, headless ComfyUI server on either host: the 2024 host loads
them as V1 nodes, a host with the V3 API (v0.3.64, 0.38) through comfy_entrypoint() as V3 nodes.

/object_info must show every node with the inputs, defaults and outputs of its V1 declaration on
both hosts; an ED-LoRA merged and saved through the server's nodes must hold W + α·up·down; every
shipped UI workflow must fit the nodes the server reports."""
import pytest
import torch
from safetensors import safe_open

from comfyui_mixofshow.harness import demo_models, workflows
from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora
from comfyui_mixofshow.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_mixofshow.nodes.compat import V3_IO

from .node_specs import plain_inputs
from .server_runs import WORKFLOWS, prepared_server, running, ui_to_api

PREFIX = "mixofshow_test_v3_merge"
UNET_ALPHA, TEXT_ALPHA = 0.7, 0.4
# checkpoint keys of a few ED-LoRA layers, written out by hand (SD1.5 single-file names)
CHECKPOINT_KEYS = {
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"):
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"):
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
    ("text_encoder", "text_model.encoder.layers.1.self_attn.v_proj"):
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(server, client, demo checkpoint path, demo ED-LoRA path)."""
    checkpoint, edlora = demo_models.ensure_demo_models()
    server = prepared_server(tmp_path_factory.mktemp("comfy-v3"), [("checkpoints", checkpoint), ("edlora", edlora)])
    try:
        with running(server) as client:
            yield server, client, checkpoint, edlora
    finally:
        for path in (demo_models.host_models_dir(server) / "checkpoints").glob(f"{PREFIX}_*_.*"):
            path.unlink()


def test_object_info_shows_every_node_as_declared(run):
    _, client, _, _ = run
    info = client.object_info()
    for node_id, v1 in NODE_CLASS_MAPPINGS.items():
        node = info[node_id]
        # combo options of model files depend on the server's folders, compared by the node tests
        assert plain_inputs(node["input"], with_options=False) == plain_inputs(v1.INPUT_TYPES(), False), node_id
        assert node["output"] == list(v1.RETURN_TYPES)
        assert node["output_name"] == list(getattr(v1, "RETURN_NAMES", v1.RETURN_TYPES))
        assert (node["display_name"], node["category"], node["output_node"]) == (
            NODE_DISPLAY_NAME_MAPPINGS[node_id], v1.CATEGORY, getattr(v1, "OUTPUT_NODE", False))
    units = info["MixOfShowRegionPrompt"]["input"]["required"]["units"]
    # a V3 node reports its combos as ("COMBO", {"options": ...}), a V1 node as ([options], {...})
    assert (units[0] == "COMBO") == (V3_IO is not None)
    assert plain_inputs({"required": {"units": units}})["required"]["units"][1] == ["normalized", "pixels"]


def test_edlora_merged_and_saved_by_the_server_holds_w_plus_alpha_up_down(run):
    server, client, checkpoint, edlora_path = run
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}},
        "2": {"class_type": "MixOfShowEDLoRALoader",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "edlora_name": edlora_path.name,
                         "unet_alpha": UNET_ALPHA, "text_encoder_alpha": TEXT_ALPHA}},
        "3": {"class_type": "MixOfShowSaveFusedModel",
              "inputs": {"model": ["2", 0], "clip": ["2", 1], "vae": ["1", 2], "filename_prefix": PREFIX}},
    }
    entry = client.run(graph, timeout=300)
    saved_name = next(n for n in workflows.reported_files(entry, graph, "MixOfShowSaveFusedModel")
                      if n.endswith(".safetensors"))
    edlora = load_edlora(str(edlora_path))
    with safe_open(str(checkpoint), framework="pt") as base, \
            safe_open(str(demo_models.host_models_dir(server) / saved_name), framework="pt") as saved:
        for (part, path), key in CHECKPOINT_KEYS.items():
            layer = getattr(edlora, part)[path]
            alpha = UNET_ALPHA if part == "unet" else TEXT_ALPHA
            w = base.get_tensor(key).double()
            expected = w + alpha * layer.scale * layer.up.double() @ layer.down.double()
            got = saved.get_tensor(key).double()
            tolerance = 2 ** -10 * expected.abs().max().item()  # the host may keep weights in fp16
            assert (got - expected).abs().max().item() <= tolerance, key
            assert (got - w).abs().max().item() > 10 * tolerance, key  # the merge changed the weight


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json") if not p.stem.endswith("_api")))
def test_every_shipped_ui_workflow_fits_the_reported_nodes(run, name):
    _, client, _, _ = run
    ui = workflows.load_workflow(WORKFLOWS / name)
    for node in ui["nodes"]:  # Load Image's upload button keeps a widget value that is no input
        if node["type"] == "LoadImage" and node["widgets_values"][-1:] == ["image"]:
            node["widgets_values"].pop()
    prompt = ui_to_api(ui, client.object_info())
    assert {node["class_type"] for node in prompt.values()} <= set(client.object_info())
