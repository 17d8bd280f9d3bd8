"""Every shipped workflow loads on the running host (a real server, harness/server.py): the API ones
(workflows/api/) as POST /prompt would validate them, the UI ones (workflows/) as the frontend
would load them, all against the server's /object_info. The model folders hold the files
scripts/demo.sh makes (empty stand-ins under the demo's names), the keypose adapter the
workflows name and the two LoRAs of fuse_two_loras (harness.lora_fixtures.DEMO_LORAS), so the file
lists are the ones a user sees after the demo: the workflows must default to files the demo makes."""
import json
import urllib.error

import pytest

from comfyui_mixofshow.harness import demo, demo_models, workflows
from comfyui_mixofshow.harness.lora_fixtures import DEMO_LORAS

from .node_specs import plain_spec
from .server_runs import VIRTUAL_NODES, WORKFLOWS, prepared_server, running, ui_to_api

UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
API_WORKFLOWS = sorted(workflows.API_WORKFLOWS.glob("*.json"))
ADAPTER = "t2iadapter_openpose_sd14v1.pth"  # the real keypose adapter the regional workflows name (README)
WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}


def demo_files():
    """{models subfolder: names} of what scripts/demo.sh leaves in the model folders."""
    return {"checkpoints": [demo_models.DEMO_CHECKPOINT, demo_models.DEMO_SDXL_CHECKPOINT],
            "edlora": [demo_models.demo_edlora_name(animal) for animal, _ in demo.DEMO_TRAINING],
            "controlnet": [demo_models.DEMO_CONTROLNET, ADAPTER],
            "loras": [name for name, _, _ in DEMO_LORAS]}


@pytest.fixture(scope="module")
def object_info(tmp_path_factory):
    server = prepared_server(tmp_path_factory.mktemp("comfy-shipped"), [])
    for folder, names in demo_files().items():
        for name in names:
            (server.models_dir(folder) / name).touch()
    for pose in (WORKFLOWS / "poses").glob("*.png"):
        (server.run_dir / "input" / pose.name).write_bytes(pose.read_bytes())
    with running(server) as client:
        yield client.object_info(), templates(client)


def templates(client):
    """GET /workflow_templates ({custom node folder: template names}); None where the host has no such
    route (the 2024 host: its frontend has no template browser)."""
    try:
        return client.get_json("/workflow_templates")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def spec_of(info, class_type, name):
    inputs = info[class_type]["input"]
    return inputs.get("required", {}).get(name) or inputs.get("optional", {}).get(name)


def value_problem(spec, value):
    """Why `value` is no valid widget value of this input (None when it is)."""
    kind, choices, options = plain_spec(spec)
    if choices is not None:
        return None if value in choices else f"{value!r} is not among {choices}"
    if kind not in WIDGET_TYPES:
        return f"{value!r} given to a {kind} socket"
    if not isinstance(value, WIDGET_TYPES[kind]) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return f"{value!r} is no {kind}"
    if kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
        return f"{value} is outside [{options.get('min')}, {options.get('max')}]"
    return None


def prompt_problems(prompt, info):
    """Every reason the server's validation would refuse this API-format prompt."""
    problems = []
    for node_id, node in prompt.items():
        class_type = node["class_type"]
        if class_type not in info:
            problems.append(f"node {node_id}: no node type {class_type}")
            continue
        where = f"node {node_id} ({class_type})"
        required = info[class_type]["input"].get("required", {})
        problems += [f"{where}: required input {name} missing" for name in required if name not in node["inputs"]]
        for name, value in node["inputs"].items():
            spec = spec_of(info, class_type, name)
            if spec is None:
                problems.append(f"{where}: no input {name}")
                continue
            kind = spec[0]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt.get(value[0])
                output = info.get(source["class_type"], {}).get("output", []) if source else []
                given = output[value[1]] if value[1] < len(output) else None
                if kind not in (given, "*") and given not in str(kind).split(","):
                    problems.append(f"{where}: {name} linked to {value} giving {given}, expects {kind}")
            elif (problem := value_problem(spec, value)) is not None:
                problems.append(f"{where}: {name}: {problem}")
    return problems


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.name)
def test_api_workflow_passes_the_servers_checks(path, object_info):
    info, _ = object_info
    assert prompt_problems(workflows.load_workflow(path), info) == []


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_loads_with_its_widget_values_in_place(path, object_info):
    info, _ = object_info
    ui = json.loads(path.read_text())
    missing = {n["type"] for n in ui["nodes"] if n["type"] not in info and n["type"] not in VIRTUAL_NODES}
    assert not missing, f"node types the server does not have: {missing}"
    assert prompt_problems(ui_to_api(ui, info), info) == []


def test_only_the_ui_workflows_are_templates(object_info):
    _, listed = object_info
    if listed is None:
        pytest.skip("this host has no /workflow_templates (the 2024 frontend has no template browser)")
    assert sorted(listed["ComfyUI-MixOfShow"]) == [p.stem for p in UI_WORKFLOWS]
