"""What a user sees of the region editor, checked on screen in every renderer (MIXOFSHOW_FRONTEND):
the pose image behind the boxes, the other regions of the chain following their own edits, the "#n" chip
on each region node's title bar, region nodes that keep their size instead of covering their neighbours,
and a picture (not a black canvas) after zooming out and back in without touching the mouse.

Colours are read from page screenshots (PIL), at places computed from the test pose image
(helpers.write_pose_image) and the regions' boxes.
"""
import io

from PIL import Image

from comfyui_mixofshow.mixofshow_core.regions import parse_box

from . import helpers
from .test_region_editor import BOX1, GRAPH_SHAPES_JS, load

# The left figure's neck-to-head limb, (150, 130)-(150, 190) of the 512 px pose image, in its colour; a
# black spot of the pose image away from limbs, grid lines and the regions' boxes.
LIMB = ((150 / 512, 160 / 512), (255, 0, 85))
BLACK = (240 / 512, 40 / 512)
REGION_COLORS = {1: (0xff, 0x4d, 0x6d), 2: (0x3d, 0xdc, 0x84), 4: (0xff, 0xb0, 0x20), 5: (0xc7, 0x7d, 0xff)}

SCREEN_RECTS_JS = r"""
(ids) => {
  const canvas = app.canvas.canvas, rect = canvas.getBoundingClientRect();
  const toClient = ([x, y]) => { const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([x, y]);
                                 return [rect.left + cx * rect.width / canvas.width, rect.top + cy * rect.height / canvas.height]; };
  const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
  const out = {};
  for (const [key, id] of Object.entries(ids)) {
    const node = app.graph.getNodeById(id);
    const element = document.querySelector(`[data-node-id="${id}"]`);
    let box, title;
    if (element) {  // Nodes 2.0: the node is an element
      const r = element.getBoundingClientRect();
      box = [r.left, r.top, r.width, r.height];
      const h = element.querySelector(".lg-node-header").getBoundingClientRect();
      title = [h.left, h.top, h.width, h.height];
    } else {  // drawn on the graph canvas at pos/size, the title bar above pos
      const [x1, y1] = toClient([node.pos[0], node.pos[1] - titleHeight]);
      const [x2, y2] = toClient([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
      const [, y3] = toClient([node.pos[0], node.pos[1]]);
      box = [x1, y1, x2 - x1, y2 - y1];
      title = [x1, y1, x2 - x1, y3 - y1];
    }
    const editor = node.mixofshowRegionEditor;
    const e = editor && editor.element.getBoundingClientRect();
    out[key] = { box, title, size: [...node.size], editor: e ? [e.left, e.top, e.width, e.height] : null };
  }
  return out;
}
"""

ZOOM_JS = r"""
(scale) => {
  const canvas = app.canvas.canvas;
  app.canvas.ds.changeScale(scale, [canvas.width / 2, canvas.height / 2]);
  app.canvas.setDirty(true, true);
  return app.canvas.ds.scale;
}
"""


def screen(page, x, y, width, height):
    """The page as shown, cropped to a client rectangle."""
    png = page.screenshot(clip={"x": x, "y": y, "width": width, "height": height})
    return Image.open(io.BytesIO(png)).convert("RGB")


def count_near(image, rgb, tol):
    return sum(1 for p in image.getdata() if max(abs(a - b) for a, b in zip(p, rgb)) <= tol)


def around(page, node_id, point, half=8):
    """The screen around a frame point (fractions 0..1) of a node's editor."""
    x, y = helpers.client_point(page, node_id, *point)
    return screen(page, x - half, y - half, 2 * half, 2 * half)


def limb_pixels(page, node_id):
    """How many pixels around LIMB on screen have the limb's colour (a region box tints it by 20 %)."""
    return count_near(around(page, node_id, LIMB[0]), LIMB[1], 60)


def eventually(page, check, tries=30):
    """check() until it is true, 100 ms apart (for the editor's next refresh); returns its last value."""
    for _ in range(tries):
        result = check()
        if result:
            return result
        page.wait_for_timeout(100)
    return check()


def rects(page, ids):
    return page.evaluate(SCREEN_RECTS_JS, ids)


def overlap(a, b):
    return (min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]) > 1
            and min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]) > 1)


def inside(inner, outer, tol=2):
    return (inner[0] >= outer[0] - tol and inner[1] >= outer[1] - tol
            and inner[0] + inner[2] <= outer[0] + outer[2] + tol and inner[1] + inner[3] <= outer[1] + outer[3] + tol)


def test_pose_image_is_drawn_behind_the_boxes(page, comfy, test_out):
    _, ids = load(page, comfy)
    for key in ("region1", "region2"):
        state = helpers.wait_editor(page, ids[key], "s && s.drawn && s.drawn.image")
        assert state["drawn"]["image"] == state["reference"]["url"] and helpers.POSE_IMAGE in state["drawn"]["image"]
        assert limb_pixels(page, ids[key]) >= 4, f"{key}: no pose limb on screen"
        dark = around(page, ids[key], BLACK, half=4)
        assert max(max(p) for p in dark.getdata()) < 40, f"{key}: the pose image's black is not black"
    page.screenshot(path=str(test_out / "pose.png"))


def test_other_regions_follow_their_edits(page, comfy, test_out):
    _, ids = load(page, comfy)
    first, second = ids["region1"], ids["region2"]
    corner = (0.02, 0.02, 0.2, 0.15)  # black in the pose image, clear of region 1's box
    green = REGION_COLORS[2]

    def greens():  # region 2's dashed outline and "#2" label on region 1's editor, at 55 % over black
        x1, y1 = helpers.client_point(page, first, *corner[:2])
        x2, y2 = helpers.client_point(page, first, *corner[2:])
        return count_near(screen(page, x1, y1, x2 - x1, y2 - y1), tuple(round(0.55 * c) for c in green), 40)

    assert greens() == 0
    helpers.type_into_widget(page, second, "box", ", ".join(map(str, corner)))
    state = helpers.wait_editor(page, first, "s && s.drawn && s.drawn.regions[1].box && s.drawn.regions[1].box.x1 === 0.02")
    assert state["drawn"]["regions"][1]["box"] == dict(zip(("x1", "y1", "x2", "y2"), corner))
    assert greens() >= 30, "region 2's new box is not shown on region 1's editor"
    page.screenshot(path=str(test_out / "sibling.png"))

    # a box set without the UI (another extension, a script) is picked up too
    page.evaluate("(id) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'box').value = '0.5, 0.5, 1, 1'; }",
                  second)
    helpers.wait_editor(page, first, "s && s.drawn && s.drawn.regions[1].box && s.drawn.regions[1].box.x1 === 0.5")
    assert greens() == 0


def chip_pixels(page, rect, index):
    return count_near(screen(page, *rect), REGION_COLORS[index], 12)


def test_title_chips_show_each_regions_number(page, comfy, test_out):
    _, ids = load(page, comfy)
    regions = {"region1": ids["region1"], "region2": ids["region2"]}
    titles = {key: r["title"] for key, r in rects(page, regions).items()}

    def chips(first, second):
        return (chip_pixels(page, titles["region1"], first), chip_pixels(page, titles["region2"], second))

    assert min(eventually(page, lambda: min(chips(1, 2)) >= 60 and chips(1, 2))) >= 60, \
        f"no #1 / #2 chips on the title bars: {chips(1, 2)} pixels of their colours"
    assert chips(2, 1) == (0, 0)
    page.screenshot(path=str(test_out / "chips.png"))
    # an Import node with three regions in front: the chips become #4 and #5
    page.evaluate(GRAPH_SHAPES_JS, ids)
    helpers.wait_editor(page, ids["region2"], "s && s.index === 5")
    assert eventually(page, lambda: min(chips(4, 5)) >= 60), f"chips not renumbered: {chips(4, 5)}"
    assert chips(1, 2) == (0, 0)
    page.screenshot(path=str(test_out / "chips_renumbered.png"))


def test_region_nodes_keep_their_size_and_do_not_cover_neighbours(page, comfy, test_out):
    _, ids = load(page, comfy)
    page.wait_for_timeout(500)  # let Nodes 2.0 measure and lay out its elements
    found = rects(page, ids)
    scale = page.evaluate("() => app.canvas.ds.scale")
    for key in ("region1", "region2"):
        mine = found[key]
        assert mine["size"] == [400, 640], f"{key} changed its size to {mine['size']}"
        assert mine["box"][3] <= (640 + 40) * scale, f"{key} is drawn {mine['box'][3]} px tall"
        assert mine["editor"] and inside(mine["editor"], mine["box"]), (key, mine)
        assert mine["editor"][3] >= 140 * scale, f"{key}'s editor is only {mine['editor'][3]} px tall"
        covered = [other for other, r in found.items() if other != key and overlap(mine["box"], r["box"])]
        assert not covered, f"{key} {mine['box']} covers {covered}: {[found[c]['box'] for c in covered]}"
    page.screenshot(path=str(test_out / "layout.png"))


def test_zooming_out_and_back_in_shows_the_picture_again(page, comfy, test_out):
    _, ids = load(page, comfy)
    node = ids["region1"]
    helpers.wait_editor(page, node, "s && s.drawn && s.drawn.image")
    assert limb_pixels(page, node) >= 4
    page.mouse.move(5, 995)  # the mouse stays here, away from the editor, until the end
    page.evaluate(ZOOM_JS, 0.3)  # the classic renderers hide DOM widgets below ~0.6, Nodes 2.0 does not
    page.wait_for_timeout(700)
    page.screenshot(path=str(test_out / "zoomed_out.png"))
    assert page.evaluate(ZOOM_JS, 1) == 1
    # the next frames, with no mouse event: the pose image and the boxes, not a black canvas
    shown = eventually(page, lambda: helpers.editor_state(page, node)["visible"] and limb_pixels(page, node) >= 4)
    page.screenshot(path=str(test_out / "zoomed_back.png"))
    assert shown, "the editor stays black after zooming back in"
    state = helpers.editor_state(page, node)
    region = parse_box(BOX1, "pixels", helpers.FRAME, helpers.FRAME)
    assert state["drawn"]["regions"][0]["box"] == {"x1": region.x1, "y1": region.y1, "x2": region.x2, "y2": region.y2}
    assert state["drawn"]["canvas"] == [round(state["rect"]["width"]), round(state["rect"]["height"])]
