"""The region box editor (web/region_editor.js) in headless Chromium on the embedded host's frontend.

A regional workflow (LoadImage pose -> ControlNetApply -> Regional Sampler, two chained Region Prompt
nodes) is built in the page and loaded with app.loadGraphData; boxes are drawn, moved, resized and
deleted with real mouse events on the editor canvas, the box text is typed through the litegraph
widget dialog, and the workflow is queued with the page's queue button. Screenshots and the
saved workflow of every test land in out/browser/<test>/ (MIXOFSHOW_TEST_OUT).
"""
import json
import os
import shutil

import pytest

from comfyui_mixofshow.harness.server import execution_errors
from comfyui_mixofshow.mixofshow_core.regions import RegionError, parse_box

from . import helpers

FRAME = helpers.FRAME
BOX1 = "32, 96, 256, 480"  # pixels of the 512x512 pose image
BOX2 = "0.55, 0.15, 0.95, 0.95"  # normalized


def load(page, comfy, box1=BOX1, box2=BOX2):
    _, _, files = comfy
    workflow, ids = helpers.build_and_load(page, pose=helpers.POSE_IMAGE, box1=box1, box2=box2, frame=FRAME,
                                           sample=helpers.SAMPLE_SIZE, checkpoint=files["checkpoint"],
                                           edlora=files["edlora"], keypose=helpers.KEYPOSE_MODEL)
    helpers.wait_editor(page, ids["region1"], "s && s.visible && s.reference && s.reference.loaded")
    helpers.wait_editor(page, ids["region2"], "s && s.visible")
    return workflow, ids


def box_of(text, units="pixels"):
    box = parse_box(text, units, FRAME, FRAME)
    return [box.x1, box.y1, box.x2, box.y2]


def as_list(box):
    return [box["x1"], box["y1"], box["x2"], box["y2"]]


def close(a, b, tol):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def assert_success(entry):
    status = entry.get("status") or {}
    assert status.get("status_str", "success") == "success", execution_errors(entry) or status


def test_extension_registers_and_editor_shows_pose_image(page, comfy, test_out):
    assert helpers.extension_registered(page)
    _, ids = load(page, comfy)
    first = helpers.editor_state(page, ids["region1"])
    second = helpers.editor_state(page, ids["region2"])
    # the pose image is found by walking Regional Sampler <- ControlNetApply <- LoadImage
    assert first["reference"]["label"] == helpers.POSE_IMAGE and first["reference"]["how"] == "graph"
    assert second["reference"]["label"] == helpers.POSE_IMAGE
    # boxes come from the text widgets; regions are numbered in chain order and colour-coded
    assert close(as_list(first["box"]), box_of(BOX1), 1e-9)
    assert close(as_list(second["box"]), box_of(BOX2, "normalized"), 1e-9)
    assert (first["index"], second["index"]) == (1, 2) and first["color"] != second["color"]
    assert [r["index"] for r in first["regions"]] == [1, 2]
    assert first["regions"][1]["prompt"] == "a small dog, standing"
    assert first["lock"] is None and first["error"] is None
    # the editor's widget is not a backend input and stores nothing in the workflow
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    inputs = prompt[str(ids["region1"])]["inputs"]
    assert inputs["box"] == BOX1 and "region_editor" not in inputs
    saved = page.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", ids["region1"])
    assert saved[:6] == ["a <cat1> <cat2>, sitting", "", BOX1, "pixels", FRAME, FRAME]
    assert all(v is None or v == "" for v in saved[7:]), saved
    page.screenshot(path=str(test_out / "loaded.png"))


def test_draw_move_resize_delete_with_the_mouse(page, comfy, test_out):
    _, ids = load(page, comfy, box1="0, 0, 512, 512")
    node = ids["region1"]
    before = helpers.editor_state(page, node)
    assert before["box"] == {"x1": 0, "y1": 0, "x2": 1, "y2": 1}

    # draw: drag from (0.1, 0.2) to (0.45, 0.9) of the frame
    helpers.drag(page, node, (0.1, 0.2), (0.45, 0.9))
    state = helpers.editor_state(page, node)
    assert close(box_of(state["boxText"]), [0.1, 0.2, 0.45, 0.9], 0.01), state["boxText"]
    assert all(float(v).is_integer() for v in state["boxText"].split(",")), "pixel units write whole pixels"
    assert close(as_list(state["box"]), box_of(state["boxText"]), 1e-9)
    page.screenshot(path=str(test_out / "1_drawn.png"))

    # move: drag from inside the box by +0.2 across, -0.1 down
    drawn = box_of(state["boxText"])
    helpers.drag(page, node, (0.25, 0.5), (0.45, 0.4))
    moved = box_of(helpers.editor_state(page, node)["boxText"])
    assert close(moved, [drawn[0] + 0.2, drawn[1] - 0.1, drawn[2] + 0.2, drawn[3] - 0.1], 0.01), moved
    page.screenshot(path=str(test_out / "2_moved.png"))

    # resize: drag the bottom-right corner to (0.8, 0.95); the top-left corner stays
    helpers.drag(page, node, (moved[2], moved[3]), (0.8, 0.95))
    resized = box_of(helpers.editor_state(page, node)["boxText"])
    assert close(resized, [moved[0], moved[1], 0.8, 0.95], 0.01), resized
    # and the top-left corner to (0.3, 0.05)
    helpers.drag(page, node, (resized[0], resized[1]), (0.3, 0.05))
    resized = box_of(helpers.editor_state(page, node)["boxText"])
    assert close(resized, [0.3, 0.05, 0.8, 0.95], 0.01), resized
    page.screenshot(path=str(test_out / "3_resized.png"))

    # a resize that collapses the box is ignored
    helpers.drag(page, node, (resized[2], resized[3]), (resized[0] + 0.001, resized[1] + 0.001))
    assert box_of(helpers.editor_state(page, node)["boxText"]) == resized

    # Escape during a drag cancels it
    x0, y0 = helpers.client_point(page, node, 0.5, 0.5)
    x1, y1 = helpers.client_point(page, node, 0.7, 0.3)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=4)
    assert helpers.editor_state(page, node)["liveBox"] is not None
    page.keyboard.press("Escape")
    page.mouse.up()
    assert box_of(helpers.editor_state(page, node)["boxText"]) == resized

    # a click without dragging changes nothing
    x, y = helpers.client_point(page, node, 0.05, 0.5)
    page.mouse.click(x, y)
    assert box_of(helpers.editor_state(page, node)["boxText"]) == resized

    # delete with a right-click inside the box: the region covers the whole image again
    helpers.right_click(page, node, (0.5, 0.5))
    assert helpers.editor_state(page, node)["boxText"] == "0, 0, 512, 512"

    # a new box, deleted with the Delete key (the node stays)
    helpers.drag(page, node, (0.6, 0.6), (0.9, 0.9))
    assert helpers.editor_state(page, node)["boxText"] != "0, 0, 512, 512"
    page.keyboard.press("Delete")
    assert helpers.editor_state(page, node)["boxText"] == "0, 0, 512, 512"
    assert page.evaluate("(id) => !!app.graph.getNodeById(id)", node)

    # normalized units write normalized values
    second = ids["region2"]
    helpers.drag(page, second, (0.4, 0.05), (0.9, 0.6))  # clear of its corner handles
    text = helpers.editor_state(page, second)["boxText"]
    assert close(box_of(text, "normalized"), [0.4, 0.05, 0.9, 0.6], 0.01), text
    assert all(0 <= float(v) <= 1 for v in text.split(","))
    page.screenshot(path=str(test_out / "4_second_region.png"))


def test_typing_in_the_box_widget_redraws(page, comfy, test_out):
    _, ids = load(page, comfy)
    node = ids["region1"]
    draws = helpers.editor_state(page, node)["drawCount"]
    helpers.type_into_widget(page, node, "box", "100, 50, 300, 400")
    state = helpers.wait_editor(page, node, "s && s.boxText === '100, 50, 300, 400'")
    assert close(as_list(state["box"]), box_of("100, 50, 300, 400"), 1e-9)
    assert state["drawCount"] > draws
    page.screenshot(path=str(test_out / "typed.png"))

    # a value the backend would reject is reported, not drawn
    helpers.type_into_widget(page, node, "box", "100, 50, 600, 400")
    state = helpers.wait_editor(page, node, "s && s.boxText === '100, 50, 600, 400'")
    assert state["box"] is None and "x2 (600) must be within 0..512" in state["error"]
    with pytest.raises(RegionError, match=r"x2 \(600\) must be within 0\.\.512"):
        parse_box(state["boxText"], "pixels", FRAME, FRAME)
    page.screenshot(path=str(test_out / "typed_invalid.png"))

    # the second region's dashed outline on the first editor follows its text too
    helpers.type_into_widget(page, ids["region2"], "box", "0.5, 0.5, 1, 1")
    state = helpers.wait_editor(page, node, "s && s.regions[1].box && s.regions[1].box.x1 === 0.5")
    assert state["regions"][1]["box"] == {"x1": 0.5, "y1": 0.5, "x2": 1, "y2": 1}


def test_units_switch_keeps_the_box(page, comfy):
    _, ids = load(page, comfy)
    node = ids["region1"]
    # choose "normalized" in the units combo through the UI: the box text is rewritten in the new units
    page.evaluate("""(id) => { const n = app.graph.getNodeById(id); const w = n.widgets.find((w) => w.name === 'units');
                               w.value = 'normalized'; w.callback(w.value, app.canvas, n); }""", node)
    state = helpers.editor_state(page, node)
    assert state["units"] == "normalized"
    assert close(box_of(state["boxText"], "normalized"), box_of(BOX1), 0.001), state["boxText"]
    # a units value set without the UI (a loaded file, another extension) leaves the text alone: it is authoritative
    text = state["boxText"]
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); n.widgets.find((w) => w.name === 'units').value = 'pixels';"
                  " app.graph.setDirtyCanvas(true, true); }", node)
    state = helpers.wait_editor(page, node, "s && s.units === 'pixels' && s.box && s.box.x2 < 0.01")
    assert state["boxText"] == text
    assert close(as_list(state["box"]), box_of(text, "pixels"), 1e-9)


def test_queue_from_the_page_produces_an_image(page, comfy, test_out):
    server, client, _ = comfy
    workflow, ids = load(page, comfy)
    helpers.drag(page, ids["region1"], (0.6, 0.05), (0.98, 0.6))  # starts outside the box: a new box
    text = helpers.editor_state(page, ids["region1"])["boxText"]
    assert close(box_of(text), [0.6, 0.05, 0.98, 0.6], 0.01), text
    (test_out / "workflow.json").write_text(json.dumps(helpers.saved_workflow(page), indent=1))
    known = set(client.history())
    helpers.queue(page)
    prompt_id, entry = helpers.wait_history_image(client, known)
    assert_success(entry)
    sent = entry["prompt"][2]
    assert sent[str(ids["region1"])]["inputs"]["box"] == text
    assert sent[str(ids["region1"])]["inputs"]["units"] == "pixels"
    assert "region_editor" not in sent[str(ids["region1"])]["inputs"]
    images = client.images(entry)
    assert len(images) == 1 and images[0][1][:8] == b"\x89PNG\r\n\x1a\n"
    (test_out / "output.png").write_bytes(images[0][1])
    # the page shows the result too
    page.wait_for_function("(id) => { const n = app.graph.getNodeById(id);"
                           " return (n.imgs && n.imgs.length > 0) || !!(app.nodeOutputs && app.nodeOutputs[id]); }",
                           arg=ids["save"], timeout=30000)
    page.screenshot(path=str(test_out / "queued.png"))


def test_saved_workflow_runs_without_the_extension(browser, page, comfy, test_out):
    """A workflow saved with the editor loads and runs on a page where the extension is missing."""
    server, client, _ = comfy
    _, ids = load(page, comfy)
    helpers.drag(page, ids["region1"], (0.1, 0.1), (0.4, 0.9))
    text = helpers.editor_state(page, ids["region1"])["boxText"]
    saved = helpers.saved_workflow(page)
    (test_out / "saved_with_editor.json").write_text(json.dumps(saved, indent=1))

    context = browser.new_context(viewport={"width": 1800, "height": 1000})
    try:
        bare = context.new_page()
        helpers.patch_object_info(bare)
        bare.route(f"**{helpers.EXTENSION_URL}**", lambda route: route.fulfill(
            status=200, content_type="application/javascript", body="export {};"))
        bare.goto(server.url + "/", timeout=180000)
        helpers.wait_for_app(bare)
        assert not helpers.extension_registered(bare)
        bare.evaluate(helpers.LOAD_WORKFLOW_JS, saved)
        values = helpers.widget_values(bare, ids["region1"])
        assert values["box"] == text and values["units"] == "pixels" and "region_editor" not in values
        known = set(client.history())
        helpers.queue(bare)
        _, entry = helpers.wait_history_image(client, known)
        assert_success(entry)
        assert entry["prompt"][2][str(ids["region1"])]["inputs"]["box"] == text
        assert len(client.images(entry)) == 1
        bare.screenshot(path=str(test_out / "without_extension.png"))
    finally:
        context.close()


GRAPH_SHAPES_JS = r"""
(ids) => {
  const g = app.graph, region1 = g.getNodeById(ids.region1), pose = g.getNodeById(ids.pose);
  const imp = LiteGraph.createNode("MixOfShowRegionPromptImport");
  imp.pos = [340, 700];
  g.add(imp);
  imp.widgets.find((w) => w.name === "prompt_rewrite").value =
    "[a cat]-*-[]-*-[0, 0, 256, 256]|[a bird]-*-[]-*-[]|[broken]-*-[]-*-[0, 0, 9999, 1]";
  imp.connect(0, region1, region1.inputs.findIndex((i) => i.name === "regions"));
  pose.connect(1, region1, region1.inputs.findIndex((i) => i.name === "mask"));  // LoadImage MASK -> mask
  const lone = LiteGraph.createNode("MixOfShowRegionPrompt");
  lone.pos = [2000, 40];
  g.add(lone);
  g.setDirtyCanvas(true, true);
  return { imp: imp.id, lone: lone.id };
}
"""


def test_chain_numbering_import_mask_and_fallbacks(page, comfy, test_out):
    _, ids = load(page, comfy)
    extra = page.evaluate(GRAPH_SHAPES_JS, ids)
    node = ids["region1"]
    # an Import node in front of region 1 shifts the numbers: its 3 entries come first
    state = helpers.wait_editor(page, node, "s && s.index === 4 && s.lock")
    assert [r["index"] for r in state["regions"]] == [1, 2, 3, 4, 5]
    assert state["regions"][0]["box"] == {"x1": 0, "y1": 0, "x2": 0.5, "y2": 0.5}
    assert state["regions"][1]["box"] == {"x1": 0, "y1": 0, "x2": 1, "y2": 1}
    assert state["regions"][2]["box"] is None and "9999" in state["regions"][2]["error"]
    assert helpers.editor_state(page, ids["region2"])["index"] == 5
    imp = helpers.editor_state(page, extra["imp"])
    assert imp["lock"].startswith("read-only") and imp["reference"]["label"] == helpers.POSE_IMAGE
    # with a mask connected the box is ignored by the node, so the editor does not change it
    assert state["lock"] == "mask connected: the box is ignored"
    helpers.drag(page, node, (0.6, 0.1), (0.9, 0.5))
    assert helpers.editor_state(page, node)["boxText"] == BOX1
    # a region node that feeds no sampler falls back to the graph's only LoadImage
    lone = helpers.editor_state(page, extra["lone"])
    assert lone["reference"]["how"] == "only LoadImage" and lone["index"] == 1
    # ... and to a blank frame when the graph has none
    page.evaluate("(id) => app.graph.remove(app.graph.getNodeById(id))", ids["pose"])
    helpers.wait_editor(page, extra["lone"], "s && s.reference === null")
    page.screenshot(path=str(test_out / "graph_shapes.png"))


# Region box texts and what mixofshow_core.regions.parse_box makes of them; region_box.js must agree.
PARITY_CASES = [("0, 0, 1, 1", "normalized"), ("0.1,0.2,0.3,0.4", "normalized"), ("[0.1 0.2 0.3 0.4]", "normalized"),
                ("(0, 0, 0.5, 1)", "normalized"), ("0, 0, 512, 512", "pixels"), (" 10 , 20 , 30 , 40 ", "pixels"),
                ("1e1, 2e1, 3e1, 4e1", "pixels"), ("0, 0, 1", "normalized"), ("0, 0, 1, 1, 1", "normalized"),
                ("0, 0, 1.5, 1", "normalized"), ("0.5, 0, 0.5, 1", "normalized"), ("0, 0.6, 1, 0.4", "normalized"),
                ("a, 0, 1, 1", "normalized"), ("0, 0, inf, 1", "normalized"), ("0, 0, nan, 1", "normalized"),
                ("", "normalized"), ("0, 0, 513, 512", "pixels"), ("-1, 0, 10, 10", "pixels"),
                ("0,,1,1", "normalized"), ("0, 0, 1, 1", "centimetres")]


def test_js_box_parser_matches_python(page):
    results = page.evaluate("""async (cases) => {
        const m = await import('/extensions/ComfyUI-MixOfShow/region_box.js');
        return cases.map(([text, units]) => {
          const r = m.tryParseBox(text, units, 512, 512);
          const out = { box: r.box ? [r.box.x1, r.box.y1, r.box.x2, r.box.y2] : null, error: r.error ?? null };
          if (r.box) { const back = m.tryParseBox(m.formatBox(r.box, units, 512, 512), units, 512, 512);
                       out.roundtrip = back.box ? [back.box.x1, back.box.y1, back.box.x2, back.box.y2] : null; }
          return out;
        });
    }""", PARITY_CASES)
    for (text, units), js in zip(PARITY_CASES, results):
        try:
            box = parse_box(text, units, FRAME, FRAME)
        except RegionError:
            assert js["box"] is None and js["error"], (text, units, js)
            continue
        assert js["box"] is not None, (text, units, js)
        assert close(js["box"], [box.x1, box.y1, box.x2, box.y2], 1e-12), (text, js)
        assert close(js["roundtrip"], js["box"], 1e-3), (text, js)


def test_docs_screenshot(page, comfy, test_out):
    """The README screenshots: both regions drawn over the pose image (docs/region_editor.png for the bundled
    frontend, docs/region_editor_<frontend>.png for the others; only with MIXOFSHOW_UPDATE_DOCS=1)."""
    _, ids = load(page, comfy, box1="0, 0, 512, 512", box2="0, 0, 1, 1")
    helpers.drag(page, ids["region1"], (0.08, 0.12), (0.5, 0.97))
    helpers.drag(page, ids["region2"], (0.52, 0.12), (0.93, 0.97))
    # hover the first box's corner so the handles and cursor show a live editor
    x, y = helpers.client_point(page, ids["region1"], 0.5, 0.97)
    page.mouse.move(x, y)
    page.wait_for_timeout(200)
    clip = {"x": 50, "y": 20, "width": 1200, "height": 740}  # the pose and both Region Prompt nodes
    path = test_out / "region_editor.png"
    page.screenshot(path=str(path), clip=clip)
    if os.environ.get("MIXOFSHOW_UPDATE_DOCS") == "1":
        name = "region_editor.png" if helpers.FRONTEND == "bundled" else f"region_editor_{helpers.FRONTEND}.png"
        (helpers.ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, helpers.ROOT / "docs" / name)
