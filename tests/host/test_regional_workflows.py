"""The regional keypose workflows (workflows/regional_*_concepts*.json) through a real, headless
ComfyUI server (harness/server.py) and its HTTP API.

The demo checkpoint, the demo ED-LoRAs (<cat1> <cat2>, <dog1> <dog2>, <owl1> <owl2>) and the
demo keypose ControlNet, generated once into .host/run as scripts/demo.sh does. The ControlNet
stands in for the workflows' T2I-Adapter placeholder: ComfyUI's T2I-Adapter loader only builds
adapters of widths [c, 2c, 4c, 4c], which the demo UNet (320 channels at every level) cannot
take; both go through the same ControlNetLoader and ControlNetApplyAdvanced nodes. The pose
PNGs are uploaded through /upload/image.
"""
import pytest

from comfyui_mixofshow.harness import demo_models, workflows

from .server_runs import (WORKFLOWS, assert_ui_matches_api, checked_pixels, prepared_server, run_image, running,
                          workflow_pair)

WIDTH, HEIGHT, STEPS = 128, 64, 2
SCENES = {"two": ("two_people_keypose.png", ["cat", "dog"]),
          "three": ("three_people_keypose.png", ["cat", "dog", "owl"])}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(server, client, {scene: uploaded pose name}): a server in a temporary run folder."""
    checkpoint, edloras = demo_models.ensure_demo_concepts()  # cached in .host/run, shared with the demo
    controlnet = demo_models.ensure_demo_controlnet()
    model_files = [("checkpoints", checkpoint), ("controlnet", controlnet)] + [("edlora", e) for e in edloras]
    server = prepared_server(tmp_path_factory.mktemp("comfy-regional"), model_files)
    with running(server) as client:
        poses = {scene: client.upload_image(WORKFLOWS / "poses" / pose) for scene, (pose, _) in SCENES.items()}
        yield server, client, poses


def test_pose_images_are_the_workflows_size():
    for pose, _ in SCENES.values():
        assert workflows.png_size((WORKFLOWS / "poses" / pose).read_bytes()) == (1024, 512)


def api_workflow(scene, pose):
    """The shipped API workflow with the test's adapter, the uploaded pose and a short run."""
    graph = workflows.load_workflow(WORKFLOWS / "api" / f"regional_{scene}_concepts_api.json")
    changes = {"ControlNetLoader": {"control_net_name": demo_models.DEMO_CONTROLNET}, "LoadImage": {"image": pose},
               "EmptyLatentImage": {"width": WIDTH, "height": HEIGHT}, "KSampler": {"steps": STEPS}}
    for node in graph.values():
        node["inputs"].update(changes.get(node["class_type"], {}))
    return graph


@pytest.mark.parametrize("scene", SCENES)
def test_regional_workflow_produces_an_image(run, scene):
    server, client, poses = run
    graph = api_workflow(scene, poses[scene])
    regions = [n["inputs"]["prompt"] for n in graph.values() if n["class_type"] == "MixOfShowRegionPrompt"]
    assert [prompt.split(",")[0] for prompt in regions] == [f"a <{name}1> <{name}2>" for name in SCENES[scene][1]]
    info, png = run_image(client, graph, timeout=300)
    assert info["filename"].startswith(f"mixofshow_regional_{scene}")
    checked_pixels(png, (WIDTH, HEIGHT))
    log = server.log_path.read_text(errors="replace")
    assert "control could not be applied" not in log, "the ControlNet residuals do not fit the UNet"


@pytest.mark.parametrize("scene", SCENES)
def test_ui_workflow_is_consistent_with_the_api_workflow(run, scene):
    _, client, _ = run
    ui, api = workflow_pair(f"regional_{scene}_concepts")
    for node in ui["nodes"]:  # the image-upload button's widget value is not an input
        if node["type"] == "LoadImage":
            assert node["widgets_values"].pop() == "image"
    assert_ui_matches_api(ui, api, client.object_info())
