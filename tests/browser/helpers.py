"""Page-side helpers for the region editor browser tests: a regional workflow built in the page,
the editor's state, real mouse drags on its canvas and typing into a litegraph text widget.

Everything here drives the page the way a user does (mouse and keyboard events at screen
coordinates); page JS is used only to build the graph, to find where things are on screen and to
read state back.
"""
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SETUP = "bash scripts/setup_browser.sh"

# MIXOFSHOW_FRONTEND -> (frontend package version or None for the host's own, Comfy.VueNodes.Enabled)
FRONTENDS = {"bundled": (None, False), "1.58.1": ("1.58.1", False), "1.58.1-vue": ("1.58.1", True)}
FRONTEND = os.environ.get("MIXOFSHOW_FRONTEND") or "bundled"
if FRONTEND not in FRONTENDS:
    raise ValueError(f"MIXOFSHOW_FRONTEND={FRONTEND!r} must be one of {', '.join(FRONTENDS)}")
FRONTEND_VERSION, VUE_NODES = FRONTENDS[FRONTEND]


def chromium_path():
    """The chromium binary: MIXOFSHOW_CHROMIUM, else the first of CHROMIUM_NAMES on PATH; None if none."""
    configured = os.environ.get("MIXOFSHOW_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def frontend_root(version=FRONTEND_VERSION):
    """The static folder of comfyui-frontend-package==version as scripts/setup_browser.sh installs it."""
    return ROOT / ".host" / "frontends" / version / "comfyui_frontend_package" / "static"


def host_serves_other_frontends(host_dir):
    """True when the ComfyUI host has --front-end-root (v0.3.x and later; the 2024 host serves only web/)."""
    try:
        return "--front-end-root" in (Path(host_dir) / "comfy" / "cli_args.py").read_text()
    except OSError:
        return False


def skip_reason(host_dir):
    """Why the browser tests cannot run here (one sentence), or None."""
    if chromium_path() is None:
        return (f"chromium is not installed ({SETUP}, apt-get install -y chromium, or set MIXOFSHOW_CHROMIUM); "
                "the region editor browser tests need it")
    if importlib.util.find_spec("playwright") is None:
        return (f"chromium is installed but the Python package playwright is not ({SETUP}); "
                "the region editor browser tests need both")
    if FRONTEND_VERSION and not (frontend_root() / "index.html").is_file():
        return f"frontend {FRONTEND_VERSION} is not installed in {frontend_root().parents[1]} ({SETUP})"
    if FRONTEND_VERSION and not host_serves_other_frontends(host_dir):
        return (f"MIXOFSHOW_FRONTEND={FRONTEND} needs a ComfyUI host with --front-end-root ({host_dir} has none): "
                "set MIXOFSHOW_COMFYUI to a v0.3.64 checkout")
    return None


EXTENSION = "mixofshow.RegionEditor"
EXTENSION_URL = "/extensions/ComfyUI-MixOfShow/"
# Loader nodes the current frontend's model browser expects (comfyui-frontend-package 1.27: it throws while
# creating any model combo, e.g. CheckpointLoaderSimple, when one of them is missing from /object_info).
FRONTEND_LOADERS = {"UpscaleModelLoader": ("model_name", "UPSCALE_MODEL")}
POSE_IMAGE = "mixofshow_test_pose.png"
KEYPOSE_MODEL = "mixofshow_test_keypose.safetensors"
FRAME = 512  # the regions are laid out on the 512x512 pose image ...
SAMPLE_SIZE = 64  # ... and the demo model samples 64x64 (same aspect, which is what regions need)

# OpenPose-style limb colours for the test pose image
_LIMBS = [((0, -150), (0, -90), (255, 0, 85)), ((0, -90), (-55, -80), (255, 85, 0)),
          ((-55, -80), (-75, -10), (255, 170, 0)), ((-75, -10), (-85, 50), (255, 255, 0)),
          ((0, -90), (55, -80), (170, 255, 0)), ((55, -80), (75, -10), (85, 255, 0)),
          ((75, -10), (85, 50), (0, 255, 0)), ((0, -90), (-30, 40), (0, 255, 85)),
          ((-30, 40), (-35, 120), (0, 255, 170)), ((-35, 120), (-40, 190), (0, 255, 255)),
          ((0, -90), (30, 40), (0, 170, 255)), ((30, 40), (35, 120), (0, 85, 255)),
          ((35, 120), (40, 190), (0, 0, 255))]


def write_pose_image(path, size=FRAME):
    """A keypose-style image: two stick figures on black, left and right (the regions' targets)."""
    image = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(image)
    scale = size / 512
    for cx, cy in ((150, 280), (370, 280)):
        for (x1, y1), (x2, y2), color in _LIMBS:
            draw.line([(cx + x1) * scale, (cy + y1) * scale, (cx + x2) * scale, (cy + y2) * scale],
                      fill=color, width=max(2, int(9 * scale)))
        for (x, y), _, color in _LIMBS:
            r = 5 * scale
            draw.ellipse([(cx + x) * scale - r, (cy + y) * scale - r, (cx + x) * scale + r, (cy + y) * scale + r],
                         fill=color)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# The regional workflow, built with LiteGraph.createNode in the page, serialized and loaded again with
# app.loadGraphData (the path a workflow file takes). LoadImage feeds the pose image through
# ControlNetApply into the Regional Sampler's positive input, the Mix-of-Show keypose shape. The tiny
# test adapter does not fit the demo checkpoint's UNet, so its strength is 0 (ControlNetApply then
# passes the conditioning through); the graph shape is what the editor's image lookup walks.
BUILD_WORKFLOW_JS = r"""
(cfg) => {
  const graph = app.graph;
  graph.clear();
  const nodes = {};
  const add = (key, type, pos, size, values = {}) => {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error("no node type " + type);
    node.pos = pos;
    graph.add(node);
    for (const [name, value] of Object.entries(values)) {
      const w = node.widgets.find((w) => w.name === name);
      if (!w) throw new Error(type + " has no widget " + name);
      w.value = value;
    }
    if (size) node.size = size;
    nodes[key] = node;
    return node;
  };
  const link = (from, slot, to, input) => {
    const target = nodes[to];
    const index = target.inputs.findIndex((i) => i.name === input);
    if (index < 0) throw new Error(target.type + " has no input " + input);
    nodes[from].connect(slot, target, index);
  };
  add("pose", "LoadImage", [20, 40], [300, 420], { image: cfg.pose });
  add("region1", "MixOfShowRegionPrompt", [340, 40], [400, 640],
      { prompt: "a <cat1> <cat2>, sitting", negative_prompt: "", box: cfg.box1, units: "pixels",
        width: cfg.frame, height: cfg.frame });
  add("region2", "MixOfShowRegionPrompt", [760, 40], [400, 640],
      { prompt: "a small dog, standing", negative_prompt: "", box: cfg.box2, units: "normalized",
        width: cfg.frame, height: cfg.frame });
  add("sampler", "MixOfShowRegionalSampler", [1180, 40], null,
      { seed: 1, steps: 3, cfg: 7.0, sampler_name: "euler", scheduler: "normal", denoise: 1.0 });
  add("ckpt", "CheckpointLoaderSimple", [20, 760], null, { ckpt_name: cfg.checkpoint });
  add("edlora", "MixOfShowEDLoRALoader", [340, 760], null, { edlora_name: cfg.edlora });
  add("positive", "MixOfShowEDLoRATextEncode", [700, 760], null, { text: "a photo of <cat1> <cat2> and a dog" });
  add("negative", "MixOfShowEDLoRATextEncode", [700, 960], null, { text: "blurry" });
  add("cnet", "ControlNetLoader", [20, 960], null, { control_net_name: cfg.keypose });
  add("apply", "ControlNetApply", [1060, 760], null, { strength: 0.0 });
  add("latent", "EmptyLatentImage", [1060, 960], null, { width: cfg.sample, height: cfg.sample, batch_size: 1 });
  add("decode", "VAEDecode", [1400, 760]);
  add("save", "SaveImage", [1600, 760], null, { filename_prefix: "mixofshow_region_editor" });
  link("ckpt", 0, "edlora", "model"); link("ckpt", 1, "edlora", "clip");
  link("edlora", 1, "positive", "clip"); link("edlora", 1, "negative", "clip");
  link("edlora", 1, "region1", "clip"); link("edlora", 1, "region2", "clip");
  link("region1", 0, "region2", "regions");
  link("positive", 0, "apply", "conditioning"); link("cnet", 0, "apply", "control_net");
  link("pose", 0, "apply", "image");
  link("edlora", 0, "sampler", "model"); link("apply", 0, "sampler", "positive");
  link("negative", 0, "sampler", "negative"); link("region2", 0, "sampler", "regions");
  link("latent", 0, "sampler", "latent_image");
  link("sampler", 0, "decode", "samples"); link("ckpt", 2, "decode", "vae");
  link("decode", 0, "save", "images");
  const ids = Object.fromEntries(Object.entries(nodes).map(([k, n]) => [k, n.id]));
  return { workflow: JSON.parse(JSON.stringify(graph.serialize())), ids };  // JSON drops undefined
}
"""

LOAD_WORKFLOW_JS = r"""
async (workflow) => {
  await app.loadGraphData(workflow);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [60, 60];  // title bars clear of the current frontend's menu and side bars
  app.graph.setDirtyCanvas(true, true);
  return true;
}
"""

EDITOR_STATE_JS = r"""
(id) => {
  const node = app.graph.getNodeById(id);
  const editor = node && node.mixofshowRegionEditor;
  if (!editor) return null;
  const rect = editor.canvas.getBoundingClientRect();
  const box = node.widgets.find((w) => w.name === "box");
  return { ...editor.state(), boxText: box ? box.value : null,
           units: node.widgets.find((w) => w.name === "units")?.value,
           visible: editor.element.style.display !== "none" && !editor.element.hidden && rect.width > 20 && rect.height > 20,
           rect: { left: rect.left, top: rect.top, width: rect.width, height: rect.height } };
}
"""

CLIENT_POINT_JS = r"""
([id, fx, fy]) => app.graph.getNodeById(id).mixofshowRegionEditor.clientPoint(fx, fy)
"""

# Screen position of the middle of a litegraph widget (drawn on the graph canvas, not a DOM element).
WIDGET_POINT_JS = r"""
([id, name]) => {
  const node = app.graph.getNodeById(id);
  const w = node.widgets.find((w) => w.name === name);
  const y = w.last_y ?? w.y;
  const canvas = app.canvas.canvas;
  const rect = canvas.getBoundingClientRect();
  const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] * 0.5, node.pos[1] + y + 10]);
  return { x: rect.left + cx * rect.width / canvas.width, y: rect.top + cy * rect.height / canvas.height };
}
"""

WIDGET_VALUES_JS = r"""
(id) => {
  const node = app.graph.getNodeById(id);
  return Object.fromEntries(node.widgets.map((w) => [w.name, w.value ?? null]));
}
"""


def patch_object_info(page):
    """On hosts where a core loader node failed to import (a current ComfyUI without torchvision lacks
    UpscaleModelLoader), adds a stub definition to /object_info so the current frontend can build model
    combos; the stub is never queued. Does nothing where the node exists."""
    def handle(route):
        response = route.fetch()
        try:
            data = response.json()
        except ValueError:
            return route.fulfill(response=response)
        for name, (input_name, output) in FRONTEND_LOADERS.items():
            data.setdefault(name, {
                "input": {"required": {input_name: [[]]}}, "input_order": {"required": [input_name]},
                "output": [output], "output_is_list": [False], "output_name": [output], "name": name,
                "display_name": name + " (missing on this host)", "description": "", "python_module": "nodes",
                "category": "loaders", "output_node": False})
        route.fulfill(response=response, json=data)
    page.route("**/object_info", handle)


def queue(page):
    """Presses the page's queue button: "Run" on the current frontend, "Queue Prompt" on the 2024 one."""
    for selector in ('[data-testid="queue-button"]', "#queue-button"):
        button = page.locator(selector).first
        if button.count() and button.is_visible():
            button.click()
            return selector
    raise AssertionError("no visible queue button on the page")


def wait_for_app(page, timeout=180000):  # generous: a loaded 2-core machine takes minutes
    page.wait_for_function(
        "() => window.app && app.graph && app.canvas && Array.isArray(app.extensions)"
        " && typeof LiteGraph !== 'undefined'"
        " && LiteGraph.registered_node_types && !!LiteGraph.registered_node_types['MixOfShowRegionPrompt']",
        timeout=timeout)


# Frontend 1.58 reports deprecated litegraph API through LiteGraph.onDeprecationWarning (once per message unless
# alwaysRepeatWarnings): every report is kept with its stack, to tell the extension's uses from the frontend's.
WATCH_DEPRECATIONS_JS = r"""
() => {
  window.mixofshowDeprecations = [];
  if (!Array.isArray(LiteGraph.onDeprecationWarning)) return false;
  LiteGraph.alwaysRepeatWarnings = true;
  LiteGraph.onDeprecationWarning.push((message) => window.mixofshowDeprecations.push(
    { message: String(message), stack: String(new Error().stack) }));
  return true;
}
"""


def watch_deprecations(page):
    return page.evaluate(WATCH_DEPRECATIONS_JS)


def deprecations_from_extension(page):
    """Deprecated frontend API the extension used since watch_deprecations: ['message', ...]."""
    found = page.evaluate("() => window.mixofshowDeprecations || []")
    return sorted({d["message"] for d in found if EXTENSION_URL in d["stack"]})


def extension_registered(page):
    return page.evaluate(f"() => app.extensions.some((e) => e.name === {json.dumps(EXTENSION)})")


def build_and_load(page, **cfg):
    """Builds the regional workflow in the page, reloads it through app.loadGraphData; returns
    (workflow JSON, {key: node id})."""
    built = page.evaluate(BUILD_WORKFLOW_JS, cfg)
    page.evaluate(LOAD_WORKFLOW_JS, built["workflow"])
    return built["workflow"], built["ids"]


def editor_state(page, node_id):
    return page.evaluate(EDITOR_STATE_JS, node_id)


def wait_editor(page, node_id, predicate="s && s.visible", timeout=20000):
    """Waits until the editor state satisfies a JS predicate over `s`; returns the state."""
    page.wait_for_function(f"(id) => {{ const s = ({EDITOR_STATE_JS})(id); return {predicate}; }}",
                           arg=node_id, timeout=timeout)
    return editor_state(page, node_id)


def client_point(page, node_id, fx, fy):
    p = page.evaluate(CLIENT_POINT_JS, [node_id, fx, fy])
    return p["x"], p["y"]


def drag(page, node_id, start, end, steps=8, button="left"):
    """A real mouse drag on the editor canvas between two frame points (fractions 0..1)."""
    x0, y0 = client_point(page, node_id, *start)
    x1, y1 = client_point(page, node_id, *end)
    page.mouse.move(x0, y0)
    page.mouse.down(button=button)
    page.mouse.move(x1, y1, steps=steps)
    page.mouse.up(button=button)


def right_click(page, node_id, at):
    x, y = client_point(page, node_id, *at)
    page.mouse.click(x, y, button="right")


def type_into_widget(page, node_id, name, text):
    """Edits a text widget as a user does: in Nodes 2.0 its input element on the node; on the canvas a click
    on the widget, typing into the prompt dialog it opens and Enter."""
    if VUE_NODES:
        field = page.locator(f'[data-node-id="{node_id}"] [data-widget-name="{name}"] input').first
        field.fill(text)
        field.press("Enter")
        return
    p = page.evaluate(WIDGET_POINT_JS, [node_id, name])
    page.mouse.click(p["x"], p["y"])
    field = page.locator(".graphdialog input.value, .graphdialog textarea.value").first
    field.wait_for(state="visible", timeout=5000)
    field.fill(text)
    field.press("Enter")
    page.wait_for_function("() => !document.querySelector('.graphdialog input.value')", timeout=5000)


SERIALIZE_JS = "() => JSON.parse(JSON.stringify(app.graph.serialize()))"  # what Save writes; no undefined -> null


def saved_workflow(page):
    return page.evaluate(SERIALIZE_JS)


def widget_values(page, node_id):
    return page.evaluate(WIDGET_VALUES_JS, node_id)


def wait_history_image(client, known_ids, timeout=180):
    """Polls /history until a prompt not in known_ids finished; returns (prompt_id, entry)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = client.history()
        for prompt_id, entry in history.items():
            if prompt_id in known_ids:
                continue
            status = entry.get("status") or {}
            if status.get("completed") or entry.get("outputs"):
                return prompt_id, entry
            if status.get("status_str") == "error":
                return prompt_id, entry
        time.sleep(0.25)
    raise TimeoutError(f"no new prompt finished in /history within {timeout} s")
