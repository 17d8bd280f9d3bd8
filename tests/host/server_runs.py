"""What the server tests share: a headless ComfyUI server (harness/server.py) in a temporary run
folder, its images, and the check of a UI-format workflow against its API-format twin."""
import contextlib
import io

import numpy as np
from PIL import Image

from comfyui_mixofshow.harness import workflows
from comfyui_mixofshow.harness import server as harness_server

WORKFLOWS = harness_server.ROOT / "workflows"
VIRTUAL_NODES = {"Note", "PrimitiveNode", "Reroute"}


# -- the server ------------------------------------------------------------------------------
def prepared_server(folder, model_files):
    """A CPU server prepared in `folder`, with model_files = [(models subfolder, path)] linked in."""
    server = harness_server.Server(folder, cpu=True).prepare()
    for subfolder, path in model_files:
        (server.models_dir(subfolder) / path.name).symlink_to(path)
    return server


@contextlib.contextmanager
def running(server):
    """Starts the server; yields its client and stops it afterwards."""
    server.start(timeout=90)
    try:
        yield server.client(timeout=60)
    finally:
        server.stop()


# -- images ----------------------------------------------------------------------------------
def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0


def only_image(client, entry):
    """(image info, PNG bytes) of the one image in a history entry."""
    images = client.images(entry)
    assert len(images) == 1, entry.get("outputs")
    return images[0]


def run_image(client, graph, timeout=120):
    return only_image(client, client.run(graph, timeout))


def checked_pixels(png, size):
    """The PNG's pixels, checked to be (width, height) `size`, finite and not constant."""
    assert workflows.png_size(png) == size
    image = pixels(png)
    assert np.isfinite(image).all() and image.std() > 1e-3, "image is constant (NaN decodes to black)"
    return image


# -- UI-format workflows ---------------------------------------------------------------------
def workflow_pair(name):
    """(UI workflow, API workflow) of workflows/<name>.json and workflows/api/<name>_api.json."""
    return (workflows.load_workflow(WORKFLOWS / f"{name}.json"),
            workflows.load_workflow(workflows.API_WORKFLOWS / f"{name}_api.json"))


def ui_to_api(ui, object_info):
    """What the frontend's graphToPrompt sends for a litegraph workflow (widgets in input
    order, a seed's control_after_generate value skipped), for checking the UI file."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        spec = object_info[node["type"]]["input"]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        widgets = list(node.get("widgets_values", []))
        inputs = {}
        for name, (kind, *options) in [*spec["required"].items(), *spec.get("optional", {}).items()]:
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
                continue
            if isinstance(kind, str) and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                continue  # an unconnected socket
            inputs[name] = widgets.pop(0)
            if kind == "INT" and name in ("seed", "noise_seed"):
                assert widgets.pop(0) in ("fixed", "increment", "decrement", "randomize")
            if options and options[0].get("image_upload") and widgets[:1] == ["image"]:
                widgets.pop(0)  # the upload button's value, which graphToPrompt does not send
        assert not widgets, f"node {node['id']} {node['type']}: unused widget values {widgets}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def assert_ui_matches_api(ui, api, object_info):
    """The UI workflow's ids and links are consistent, and it sends the API workflow."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(l[0] for l in ui["links"])
    for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert object_info[nodes[origin]["type"]]["output"][origin_slot] == kind
        assert nodes[target]["inputs"][target_slot]["type"] == kind
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(ui, object_info) == expected
