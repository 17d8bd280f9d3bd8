// Region box editor for the Mix-of-Show region nodes.
//
// Adds a canvas under the widgets of every "Region Prompt" node: it shows the pose/sketch image wired
// into the graph (or a blank frame of width x height) with the region's box, which the user draws by
// dragging, moves by dragging inside it, resizes by its corners and deletes with a right-click or the
// Delete key (the box then covers the whole image again). Every edit is written into the node's plain
// "box" text widget, which stays visible and authoritative: typing there redraws the box, and workflows
// never store anything of the editor (its widget is not serialized), so they run without this file.
// The boxes of the other regions of the chain are drawn dashed, each colour-coded and numbered in the
// order the sampler receives them. "Region Prompt Import" nodes get the same canvas, read-only.
//
// Works on the 2024 vanilla-JS frontend and on the current frontend in both of its renderers, the classic
// canvas and Nodes 2.0 (Vue components, where nodes are not drawn on the graph canvas): it uses
// app.registerExtension, node.addDOMWidget, node.widgets and the node link methods both litegraph versions
// have (isInputConnected, getInputNode, getOutputNodes). It redraws on its own timer and when its canvas is
// resized, not only when the graph canvas draws the node, and shows its "#n" title chip on the canvas or,
// in Nodes 2.0, as an element in the node's header.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { formatBox, fullBox, isFullBox, parsePromptRewrite, tryParseBox } from "./region_box.js";

const EXTENSION = "mixofshow.RegionEditor";
const REGION_PROMPT = "MixOfShowRegionPrompt";
const REGION_IMPORT = "MixOfShowRegionPromptImport";
const SINKS = new Set(["MixOfShowApplyRegions", "MixOfShowRegionalSampler"]);
const WIDGET_NAME = "region_editor";
const COLORS = ["#ff4d6d", "#3ddc84", "#4d9bff", "#ffb020", "#c77dff", "#2ee6d6", "#ff7ad9", "#c5e84a"];
const HANDLE = 6; // half size of a corner handle, CSS px
const STATUS_HEIGHT = 18;
const MIN_HEIGHT = 150; // CSS px of the editor
const PAD = 4;
const MIN_DRAG = 4; // CSS px: shorter drags, and boxes narrower than this, change nothing
const MAX_WALK = 200;
const REFRESH_MS = 200; // how often every editor checks the graph for changes it has not drawn yet
const imageCache = new Map(); // url -> {img, ok, waiting: Set<editor>}

export function regionColor(index) {
    return COLORS[(Math.max(1, index) - 1) % COLORS.length];
}

function classOf(node) {
    return node?.comfyClass ?? node?.constructor?.comfyClass ?? node?.type;
}

function isRegionNode(node) {
    const type = classOf(node);
    return type === REGION_PROMPT || type === REGION_IMPORT;
}

function widget(node, name) {
    return node?.widgets?.find((w) => w.name === name);
}

function value(node, name, fallback) {
    const w = widget(node, name);
    return w === undefined || w.value === undefined ? fallback : w.value;
}

function inputSlot(node, name) {
    return node?.inputs?.findIndex((input) => input.name === name) ?? -1;
}

// Links through the node methods, never input.link / output.links (deprecated since frontend 1.58).
function inputLinked(node, name) {
    const slot = inputSlot(node, name);
    return slot >= 0 && !!node.graph && node.isInputConnected(slot);
}

function inputNode(node, slot) {
    return node.graph && node.isInputConnected(slot) ? node.getInputNode(slot) : null;
}

function outputNodes(node, slot) {
    return (node.graph && node.getOutputNodes(slot)) || [];
}

function upstream(node) {
    return (node.inputs ?? []).map((_, slot) => inputNode(node, slot)).filter(Boolean);
}

function downstream(node) {
    return (node.outputs ?? []).flatMap((_, slot) => outputNodes(node, slot)).filter(Boolean);
}

function graphNodes(node) {
    const graph = node.graph ?? app.graph;
    return graph?._nodes ?? graph?.nodes ?? [];
}

// ---------------------------------------------------------------- the region chain

/** The chain of region nodes `node` belongs to, upstream first (the order of the REGIONS list). */
function regionChain(node) {
    const seen = new Set([node]);
    const up = [];
    for (let cur = node; up.length < MAX_WALK;) {
        const slot = inputSlot(cur, "regions");
        const prev = slot < 0 ? null : inputNode(cur, slot);
        if (!prev || seen.has(prev) || !isRegionNode(prev)) break;
        seen.add(prev);
        up.unshift(prev);
        cur = prev;
    }
    const down = [];
    for (let cur = node; down.length < MAX_WALK;) {
        const next = outputNodes(cur, 0).find((n) => n && isRegionNode(n) && !seen.has(n));
        if (!next) break;
        seen.add(next);
        down.push(next);
        cur = next;
    }
    return [...up, node, ...down];
}

/** The regions of one node: [{box | error, prompt}] (Region Prompt: one; Import: one per entry). */
function nodeRegions(node) {
    if (classOf(node) === REGION_IMPORT) {
        return parsePromptRewrite(value(node, "prompt_rewrite", ""), value(node, "width", 512),
                                  value(node, "height", 512));
    }
    const parsed = inputLinked(node, "mask") ? { error: "mask" }
        : tryParseBox(value(node, "box", ""), value(node, "units", "normalized"),
                      value(node, "width", 512), value(node, "height", 512));
    return [{ ...parsed, prompt: String(value(node, "prompt", "")) }];
}

/** Every region of the chain with its 1-based index and the node it comes from. */
function chainRegions(node) {
    const regions = [];
    for (const member of regionChain(node)) {
        for (const region of nodeRegions(member)) regions.push({ ...region, node: member, index: regions.length + 1 });
    }
    return regions;
}

// ---------------------------------------------------------------- the reference image

function isImageSource(node) {
    if (node.imgs?.length && node.imgs[0]?.src) return true;
    return /LoadImage/i.test(classOf(node) ?? "") && typeof value(node, "image", null) === "string";
}

function imageSourceURL(node) {
    const name = value(node, "image", null);
    if (/LoadImage/i.test(classOf(node) ?? "") && typeof name === "string" && name) {
        let file = name, type = "input";
        const match = file.match(/^(.*) \[(input|output|temp)\]$/);
        if (match) [file, type] = [match[1], match[2]];
        const slash = file.lastIndexOf("/");
        const params = new URLSearchParams({ filename: file.slice(slash + 1), type,
                                             subfolder: slash >= 0 ? file.slice(0, slash) : "" });
        return { url: api.apiURL(`/view?${params}`), label: file.slice(slash + 1) };
    }
    if (node.imgs?.[0]?.src) return { url: node.imgs[0].src, label: node.title ?? classOf(node) };
    return null;
}

/** The pose/sketch image for the region node: the nearest image source upstream of the Apply Regions /
 *  Regional Sampler node the chain feeds (e.g. LoadImage -> Apply ControlNet -> positive), or upstream of
 *  the chain itself; when the chain reaches no sampler, the graph's only LoadImage node, if it has one. */
function findReference(node) {
    const chain = regionChain(node);
    const sinks = [];
    const seen = new Set(chain);
    const queue = [...chain];
    while (queue.length && seen.size < MAX_WALK) {
        const cur = queue.shift();
        if (SINKS.has(classOf(cur))) sinks.push(cur);
        for (const next of downstream(cur)) if (!seen.has(next)) { seen.add(next); queue.push(next); }
    }
    const visited = new Set();
    const search = [...sinks, ...chain];
    for (const start of search) visited.add(start);
    while (search.length && visited.size < MAX_WALK) {
        const cur = search.shift();
        if (!isRegionNode(cur) && isImageSource(cur)) return { node: cur, ...imageSourceURL(cur), how: "graph" };
        for (const next of upstream(cur)) if (!visited.has(next)) { visited.add(next); search.push(next); }
    }
    if (!sinks.length) {
        const loaders = graphNodes(node).filter((n) => /^LoadImage$/.test(classOf(n) ?? "") && isImageSource(n));
        if (loaders.length === 1) return { node: loaders[0], ...imageSourceURL(loaders[0]), how: "only LoadImage" };
    }
    return null;
}

function loadImage(url, editor) {
    let entry = imageCache.get(url);
    if (!entry) {
        entry = { img: new Image(), ok: false, failed: false, waiting: new Set() };
        imageCache.set(url, entry);
        entry.img.onload = () => {
            entry.ok = true;
            for (const e of entry.waiting) e.redraw();
            entry.waiting.clear();
        };
        entry.img.onerror = () => {
            entry.failed = true;
            for (const e of entry.waiting) e.redraw();
            entry.waiting.clear();
        };
        entry.img.src = url;
    }
    if (!entry.ok && !entry.failed) entry.waiting.add(editor);
    return entry;
}

// ---------------------------------------------------------------- the editor

function roundRect(ctx, x, y, w, h) {
    ctx.beginPath();
    ctx.rect(x, y, w, h);
}

class RegionEditor {
    constructor(node) {
        this.node = node;
        this.readOnly = classOf(node) === REGION_IMPORT;
        this.element = document.createElement("div");
        this.element.className = "mixofshow-region-editor";
        // The canvas is positioned absolutely so that it never sizes the element: the classic renderers set the
        // element's size from the node, Nodes 2.0 lets it fill the rows the node's own size leaves.
        Object.assign(this.element.style, { position: "relative", overflow: "hidden", boxSizing: "border-box",
                                            minHeight: `${MIN_HEIGHT}px`, background: "#151515",
                                            borderRadius: "4px" });
        this.canvas = document.createElement("canvas");
        this.canvas.tabIndex = 0;
        this.canvas.title = this.readOnly
            ? "Boxes of the imported prompt_rewrite (edit the text to change them)"
            : "Drag to draw the region's box, drag inside it to move it, drag a corner to resize it; "
              + "right-click or Delete removes it (the region covers the whole image again).";
        Object.assign(this.canvas.style, { position: "absolute", left: "0", top: "0", display: "block",
                                           width: "100%", height: "100%", outline: "none", cursor: "crosshair",
                                           touchAction: "none" });
        this.element.appendChild(this.canvas);
        this.drag = null;
        this.liveBox = null;
        this.signature = "";
        this.frame = { x: 0, y: 0, w: 1, h: 1 };
        this.referenceCheckedAt = 0;
        this.reference = null;
        this.drawCount = 0;
        this.drawn = null;
        this.chip = null;
        this.lastUnits = value(node, "units", "normalized");
        this.bind();
        // shown again after a zoom-out hid it, or resized: draw at the new size before the next paint
        this.resizeObserver = new ResizeObserver(() => this.tick());
        this.resizeObserver.observe(this.canvas);
    }

    // -- geometry ---------------------------------------------------------------------------
    frameSize() {
        const width = Number(value(this.node, "width", 512)) || 512;
        const height = Number(value(this.node, "height", 512)) || 512;
        return { width: Math.max(1, width), height: Math.max(1, height) };
    }

    layout() {
        const cssW = Math.max(1, this.canvas.clientWidth), cssH = Math.max(1, this.canvas.clientHeight);
        const { width, height } = this.frameSize();
        const availW = Math.max(1, cssW - 2 * PAD), availH = Math.max(1, cssH - 2 * PAD - STATUS_HEIGHT);
        const scale = Math.min(availW / width, availH / height);
        const w = width * scale, h = height * scale;
        this.frame = { x: (cssW - w) / 2, y: PAD + (availH - h) / 2, w, h };
        return { cssW, cssH };
    }

    /** CSS px of the canvas (before any CSS transform) per client px. */
    cssPerClient() {
        const rect = this.canvas.getBoundingClientRect();
        return { rect, sx: this.canvas.clientWidth / (rect.width || 1), sy: this.canvas.clientHeight / (rect.height || 1) };
    }

    toFrame(event) {
        const { rect, sx, sy } = this.cssPerClient();
        const x = (event.clientX - rect.left) * sx, y = (event.clientY - rect.top) * sy;
        return { x, y, fx: (x - this.frame.x) / this.frame.w, fy: (y - this.frame.y) / this.frame.h };
    }

    /** Client (page) coordinates of the frame point (fx, fy) in 0..1: for tests and tools. */
    clientPoint(fx, fy) {
        this.layout();
        const { rect, sx, sy } = this.cssPerClient();
        return { x: rect.left + (this.frame.x + fx * this.frame.w) / sx,
                 y: rect.top + (this.frame.y + fy * this.frame.h) / sy };
    }

    boxRect(box) {
        const f = this.frame;
        return { x: f.x + box.x1 * f.w, y: f.y + box.y1 * f.h, w: (box.x2 - box.x1) * f.w, h: (box.y2 - box.y1) * f.h };
    }

    // -- state ------------------------------------------------------------------------------
    /** Why the box cannot be edited here, or null. */
    lockReason() {
        if (this.readOnly) return "read-only: edit prompt_rewrite";
        if (inputLinked(this.node, "mask")) return "mask connected: the box is ignored";
        const box = widget(this.node, "box");
        if (!box) return "no box widget";
        if (box.type === "converted-widget" || inputLinked(this.node, "box")) return "box comes from an input";
        return null;
    }

    current() {
        if (this.readOnly) return { error: null, box: null };
        return tryParseBox(value(this.node, "box", ""), value(this.node, "units", "normalized"),
                           ...Object.values(this.frameSize()));
    }

    /** Everything the picture depends on, to redraw only when it changed. */
    computeSignature() {
        const parts = [this.canvas.clientWidth, this.canvas.clientHeight, window.devicePixelRatio,
                       this.reference?.url ?? "", this.lockReason() ?? ""];
        for (const r of chainRegions(this.node)) {
            parts.push(r.index, r.node.id, r.error ?? "", r.box ? [r.box.x1, r.box.y1, r.box.x2, r.box.y2].join(",") : "",
                       r.prompt);
        }
        parts.push(value(this.node, "width", ""), value(this.node, "height", ""), value(this.node, "units", ""));
        return parts.join("|");
    }

    /** Called on every canvas draw of the node: picks up typed values, links and the reference image. */
    refreshReference(maxAge = 500) {
        const now = performance.now();
        if (now - this.referenceCheckedAt > maxAge) {
            this.referenceCheckedAt = now;
            const ref = findReference(this.node);
            if ((ref?.url ?? null) !== (this.reference?.url ?? null) || ref?.how !== this.reference?.how) this.reference = ref;
        }
    }

    /** Whether the canvas is on the page with a size (not hidden by a zoom-out, a collapse or another tab). */
    shown() {
        return this.canvas.isConnected && this.canvas.clientWidth > 0 && this.canvas.clientHeight > 0;
    }

    tick() {
        this.refreshReference();
        this.lastUnits = value(this.node, "units", "normalized");
        this.updateHeaderChip();
        if (this.drag || !this.shown()) return;
        const signature = this.computeSignature();
        if (signature !== this.signature) this.redraw();
    }

    /** In Nodes 2.0 the node's header is an element: the "#n" chip is one inside it (classic: drawTitleChip). */
    updateHeaderChip() {
        const header = this.element.closest("[data-node-id]")?.querySelector(".lg-node-header");
        const chip = header && titleChip(this.node);
        if (!chip) {
            this.chip?.remove();
            return;
        }
        if (!this.chip) {
            this.chip = document.createElement("span");
            this.chip.className = "mixofshow-region-chip";
            Object.assign(this.chip.style, { font: "bold 12px sans-serif", color: "#000", padding: "1px 5px",
                                             borderRadius: "3px", flex: "none", marginLeft: "4px" });
        }
        if (this.chip.parentElement !== header.firstElementChild) header.firstElementChild.appendChild(this.chip);
        this.chip.textContent = chip.label;
        this.chip.style.background = chip.color;
    }

    sync() {
        this.referenceCheckedAt = 0;
        if (!this.drag) this.redraw();
    }

    state() {
        this.refreshReference(0);
        const parsed = this.current();
        const regions = chainRegions(this.node);
        const own = regions.find((r) => r.node === this.node);
        return {
            box: parsed.box ?? null, error: parsed.error ?? null, liveBox: this.liveBox,
            index: own?.index ?? 1, color: regionColor(own?.index ?? 1), regions: regions.map((r) => ({
                index: r.index, nodeId: r.node.id, box: r.box ?? null, error: r.error ?? null, prompt: r.prompt })),
            reference: this.reference ? { url: this.reference.url, label: this.reference.label, how: this.reference.how,
                                          loaded: !!imageCache.get(this.reference.url)?.ok } : null,
            lock: this.lockReason(), frame: { ...this.frame }, drawCount: this.drawCount, drawn: this.drawn,
            size: this.frameSize(), units: value(this.node, "units", "normalized"),
        };
    }

    // -- writing ------------------------------------------------------------------------------
    write(box) {
        const w = widget(this.node, "box");
        if (!w || this.lockReason()) return;
        const { width, height } = this.frameSize();
        const text = formatBox(box, value(this.node, "units", "normalized"), width, height);
        const old = w.value;
        w.value = text;
        w.callback?.(w.value, app.canvas, this.node);
        this.node.onWidgetChanged?.(w.name, w.value, old, w);
        this.node.setDirtyCanvas?.(true, true);
        this.node.graph?.change?.();
        this.redraw();
    }

    remove() {
        this.write(fullBox());
    }

    /** After the units combo changed through the UI: rewrite the box in the new units, if it was valid. */
    unitsChanged(newUnits) {
        const oldUnits = this.lastUnits;
        this.lastUnits = newUnits;
        if (oldUnits === newUnits || this.lockReason()) return this.sync();
        const { width, height } = this.frameSize();
        const parsed = tryParseBox(value(this.node, "box", ""), oldUnits, width, height);
        if (parsed.box) this.write(parsed.box);
        else this.sync();
    }

    // -- mouse / keys -----------------------------------------------------------------------
    hit(point) {
        const parsed = this.current();
        if (!parsed.box) return { mode: "draw" };
        const r = this.boxRect(parsed.box);
        const corners = [[r.x, r.y, "nw"], [r.x + r.w, r.y, "ne"], [r.x, r.y + r.h, "sw"], [r.x + r.w, r.y + r.h, "se"]];
        for (const [cx, cy, name] of corners) {
            if (Math.abs(point.x - cx) <= HANDLE + 2 && Math.abs(point.y - cy) <= HANDLE + 2) {
                const anchor = { fx: name.includes("w") ? parsed.box.x2 : parsed.box.x1,
                                 fy: name.includes("n") ? parsed.box.y2 : parsed.box.y1 };
                return { mode: "resize", corner: name, anchor, box: parsed.box };
            }
        }
        const inside = point.x >= r.x && point.x <= r.x + r.w && point.y >= r.y && point.y <= r.y + r.h;
        if (inside && !isFullBox(parsed.box)) return { mode: "move", box: parsed.box };
        return { mode: "draw", box: parsed.box, inside };
    }

    bind() {
        const c = this.canvas;
        const stop = (e) => { e.stopPropagation(); };
        c.addEventListener("pointerdown", (e) => {
            stop(e);
            c.focus({ preventScroll: true });
            if (e.button !== 0 || this.lockReason()) return;
            e.preventDefault();
            this.layout();
            const p = this.toFrame(e);
            const hit = this.hit(p);
            this.drag = { ...hit, start: p, pointerId: e.pointerId, moved: false };
            this.liveBox = hit.box && hit.mode !== "draw" ? { ...hit.box } : null;
            try { c.setPointerCapture(e.pointerId); } catch { /* synthetic events */ }
        });
        c.addEventListener("pointermove", (e) => {
            if (!this.drag) {
                this.layout();
                const hit = this.lockReason() ? { mode: "none" } : this.hit(this.toFrame(e));
                c.style.cursor = { move: "move", none: "default",
                                   resize: hit.corner === "nw" || hit.corner === "se" ? "nwse-resize" : "nesw-resize" }[hit.mode]
                                 ?? "crosshair";
                return;
            }
            stop(e);
            this.dragTo(this.toFrame(e));
        });
        const finish = (e, commit) => {
            if (!this.drag) return;
            stop(e);
            const drag = this.drag;
            if (commit) this.dragTo(this.toFrame(e));
            this.drag = null;
            try { c.releasePointerCapture(drag.pointerId); } catch { /* already released */ }
            const box = this.liveBox;
            this.liveBox = null;
            const big = box && (box.x2 - box.x1) * this.frame.w >= MIN_DRAG && (box.y2 - box.y1) * this.frame.h >= MIN_DRAG;
            if (commit && drag.moved && big) this.write(box);
            else this.redraw();
        };
        c.addEventListener("pointerup", (e) => finish(e, true));
        c.addEventListener("pointercancel", (e) => finish(e, false));
        c.addEventListener("lostpointercapture", (e) => { if (this.drag) finish(e, true); });
        c.addEventListener("contextmenu", (e) => {
            e.preventDefault();
            stop(e);
            if (this.lockReason()) return;
            this.layout();
            const hit = this.hit(this.toFrame(e));
            if (hit.mode === "move" || hit.mode === "resize" || hit.inside) this.remove();
        });
        c.addEventListener("keydown", (e) => {
            if (this.lockReason()) return;
            if (e.key === "Escape" && this.drag) {
                e.preventDefault();
                stop(e);
                this.drag = null;
                this.liveBox = null;
                this.redraw();
            } else if (e.key === "Delete" || e.key === "Backspace") {
                e.preventDefault();
                stop(e);
                this.remove();
            }
        });
        for (const name of ["wheel", "dblclick"]) c.addEventListener(name, stop);
    }

    dragTo(p) {
        const d = this.drag;
        const dx = p.x - d.start.x, dy = p.y - d.start.y;
        if (!d.moved && Math.hypot(dx, dy) < MIN_DRAG) return;
        d.moved = true;
        const clamp = (v) => Math.min(1, Math.max(0, v));
        if (d.mode === "move") {
            const w = d.box.x2 - d.box.x1, h = d.box.y2 - d.box.y1;
            const x1 = Math.min(1 - w, Math.max(0, d.box.x1 + dx / this.frame.w));
            const y1 = Math.min(1 - h, Math.max(0, d.box.y1 + dy / this.frame.h));
            this.liveBox = { x1, y1, x2: x1 + w, y2: y1 + h };
        } else {
            const anchor = d.mode === "resize" ? d.anchor : { fx: clamp(d.start.fx), fy: clamp(d.start.fy) };
            const fx = clamp(p.fx), fy = clamp(p.fy);
            this.liveBox = { x1: Math.min(anchor.fx, fx), y1: Math.min(anchor.fy, fy),
                             x2: Math.max(anchor.fx, fx), y2: Math.max(anchor.fy, fy) };
        }
        this.redraw();
    }

    // -- drawing ----------------------------------------------------------------------------
    redraw() {
        if (!this.shown()) return; // a hidden canvas keeps its picture and its signature: drawn once shown
        const { cssW, cssH } = this.layout();
        const ratio = window.devicePixelRatio || 1;
        const pxW = Math.round(cssW * ratio), pxH = Math.round(cssH * ratio);
        if (this.canvas.width !== pxW || this.canvas.height !== pxH) [this.canvas.width, this.canvas.height] = [pxW, pxH];
        const ctx = this.canvas.getContext("2d");
        ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
        ctx.clearRect(0, 0, cssW, cssH);
        ctx.fillStyle = "#151515";
        ctx.fillRect(0, 0, cssW, cssH);
        const f = this.frame;
        const { width, height } = this.frameSize();
        const lock = this.lockReason();
        const messages = [];

        // background: the reference image, or a blank frame with a grid of eighths
        ctx.fillStyle = "#000";
        ctx.fillRect(f.x, f.y, f.w, f.h);
        let refLabel = "blank";
        let imageDrawn = null;
        if (this.reference?.url) {
            const entry = loadImage(this.reference.url, this);
            if (entry.ok) {
                ctx.drawImage(entry.img, f.x, f.y, f.w, f.h);
                imageDrawn = this.reference.url;
                refLabel = this.reference.label;
                const iw = entry.img.naturalWidth, ih = entry.img.naturalHeight;
                if (iw && ih && Math.abs(Math.log((iw / ih) / (width / height))) > 0.02) {
                    messages.push({ text: `image ${iw}x${ih} stretched`, color: "#e0b050" });
                }
            } else {
                refLabel = entry.failed ? `${this.reference.label} (not found)` : `${this.reference.label} ...`;
            }
        }
        if (refLabel === "blank" || !imageCache.get(this.reference?.url)?.ok) {
            ctx.strokeStyle = "rgba(255,255,255,0.08)";
            ctx.lineWidth = 1;
            ctx.beginPath();
            for (let i = 1; i < 8; i++) {
                ctx.moveTo(f.x + (f.w * i) / 8, f.y);
                ctx.lineTo(f.x + (f.w * i) / 8, f.y + f.h);
                ctx.moveTo(f.x, f.y + (f.h * i) / 8);
                ctx.lineTo(f.x + f.w, f.y + (f.h * i) / 8);
            }
            ctx.stroke();
        }
        ctx.strokeStyle = "#555";
        ctx.lineWidth = 1;
        ctx.strokeRect(f.x + 0.5, f.y + 0.5, f.w - 1, f.h - 1);

        // the other regions of the chain, dashed; then this node's, solid with handles
        const regions = chainRegions(this.node);
        const own = regions.filter((r) => r.node === this.node);
        ctx.save();
        ctx.beginPath();
        ctx.rect(f.x, f.y, f.w, f.h);
        ctx.clip();
        for (const r of regions) {
            if (r.node === this.node || !r.box) continue;
            this.drawBox(ctx, r.box, regionColor(r.index), `#${r.index}`, { dashed: true, alpha: 0.55 });
        }
        for (const r of own) {
            const color = regionColor(r.index);
            const label = `#${r.index} ${snippet(r.prompt)}`;
            const box = this.readOnly ? r.box : (this.liveBox ?? r.box);
            if (r.error === "mask") continue;
            if (r.error && !this.liveBox) {
                messages.push({ text: `box: ${r.error}`, color: "#ff6060" });
                continue;
            }
            if (!box) continue;
            const whole = isFullBox(box) && !this.liveBox;
            this.drawBox(ctx, box, color, whole ? `${label} (whole image)` : label,
                         { dashed: whole, alpha: 1, handles: !this.readOnly && !lock && !whole, fill: !whole });
        }
        ctx.restore();

        // status line
        const units = value(this.node, "units", "normalized");
        if (lock) messages.unshift({ text: lock, color: "#e0b050" });
        let status = this.readOnly ? `${width}x${height} px` : `${units} · ${width}x${height}`;
        if (this.liveBox && !this.readOnly) status += ` · ${formatBox(this.liveBox, units, width, height)}`;
        ctx.font = "11px sans-serif";
        ctx.textBaseline = "middle";
        const y = cssH - STATUS_HEIGHT / 2 - 1;
        ctx.fillStyle = "#aaa";
        ctx.textAlign = "left";
        ctx.fillText(status, PAD + 2, y);
        const right = messages.length ? messages[0] : { text: refLabel, color: "#888" };
        ctx.fillStyle = right.color;
        ctx.textAlign = "right";
        const room = cssW - PAD * 2 - ctx.measureText(status).width - 12;
        ctx.fillText(fit(ctx, right.text, room), cssW - PAD - 2, y);
        this.signature = this.computeSignature();
        this.drawCount += 1;
        this.drawn = { image: imageDrawn, canvas: [this.canvas.width, this.canvas.height], regions: regions.map((r) => ({
            index: r.index, nodeId: r.node.id, box: r.node === this.node && this.liveBox ? { ...this.liveBox } : r.box ?? null })) };
    }

    drawBox(ctx, box, color, label, { dashed = false, alpha = 1, handles = false, fill = true } = {}) {
        const r = this.boxRect(box);
        ctx.save();
        ctx.globalAlpha = alpha;
        if (fill) {
            ctx.fillStyle = color + "33";
            ctx.fillRect(r.x, r.y, r.w, r.h);
        }
        ctx.strokeStyle = color;
        ctx.lineWidth = dashed ? 1.5 : 2;
        ctx.setLineDash(dashed ? [6, 4] : []);
        ctx.strokeRect(r.x + 1, r.y + 1, Math.max(0, r.w - 2), Math.max(0, r.h - 2));
        ctx.setLineDash([]);
        ctx.font = "bold 11px sans-serif";
        ctx.textBaseline = "top";
        ctx.textAlign = "left";
        const text = fit(ctx, label, Math.max(24, r.w - 6));
        const tw = ctx.measureText(text).width;
        ctx.fillStyle = color;
        ctx.fillRect(r.x + 1, r.y + 1, tw + 6, 15);
        ctx.fillStyle = "#000";
        ctx.fillText(text, r.x + 4, r.y + 3);
        if (handles) {
            for (const [x, y] of [[r.x, r.y], [r.x + r.w, r.y], [r.x, r.y + r.h], [r.x + r.w, r.y + r.h]]) {
                roundRect(ctx, x - HANDLE / 2 - 1, y - HANDLE / 2 - 1, HANDLE + 2, HANDLE + 2);
                ctx.fillStyle = "#fff";
                ctx.fill();
                roundRect(ctx, x - HANDLE / 2, y - HANDLE / 2, HANDLE, HANDLE);
                ctx.fillStyle = color;
                ctx.fill();
            }
        }
        ctx.restore();
    }
}

function snippet(prompt) {
    const text = String(prompt ?? "").replace(/\s+/g, " ").trim();
    return text.length > 28 ? text.slice(0, 27) + "…" : text;
}

function fit(ctx, text, room) {
    if (ctx.measureText(text).width <= room) return text;
    let cut = text;
    while (cut.length > 1 && ctx.measureText(cut + "…").width > room) cut = cut.slice(0, -1);
    return cut + "…";
}

// ---------------------------------------------------------------- wiring into the node

function chainCallback(object, name, after) {
    const original = object[name];
    object[name] = function (...args) {
        const result = original?.apply(this, args);
        after.apply(this, args);
        return result;
    };
}

const editors = new Set(); // every editor on the page, refreshed by one timer
let refreshTimer = null;

function refreshAll() {
    for (const editor of editors) editor.tick();
}

function attachEditor(node) {
    if (node.mixofshowRegionEditor || !node.addDOMWidget) return;
    const editor = new RegionEditor(node);
    node.mixofshowRegionEditor = editor;
    const preferredHeight = () => {
        const { width, height } = editor.frameSize();
        const inner = Math.max(120, (node.size?.[0] ?? 360) - 20 - 2 * PAD);
        return Math.round(Math.min(520, Math.max(MIN_HEIGHT, (inner * height) / width + STATUS_HEIGHT + 2 * PAD + 20)));
    };
    const w = node.addDOMWidget(WIDGET_NAME, "mixofshow_region_editor", editor.element, {
        serialize: false,
        hideOnZoom: true,
        getValue: () => undefined,
        setValue: () => {},
        getMinHeight: () => MIN_HEIGHT,
        getHeight: () => preferredHeight(),
    });
    w.serialize = false; // no entry of its own in saved widgets_values (current frontend)
    editor.widget = w;

    for (const name of ["box", "width", "height", "prompt", "prompt_rewrite"]) {
        const target = widget(node, name);
        if (target) chainCallback(target, "callback", () => editor.sync());
    }
    const units = widget(node, "units");
    if (units) chainCallback(units, "callback", () => editor.unitsChanged(units.value));
    chainCallback(node, "onDrawForeground", function (ctx) {
        editor.tick();
        drawTitleChip(this, ctx);
    });
    chainCallback(node, "onConnectionsChange", () => editor.sync());
    chainCallback(node, "onResize", () => editor.sync());
    chainCallback(node, "onRemoved", () => {
        editors.delete(editor);
        editor.chip?.remove();
    });

    if (node.size && node.size[0] < 340) {
        node.setSize?.([340, node.size[1]]);
    }
    editors.add(editor);
    refreshTimer ??= setInterval(refreshAll, REFRESH_MS);
    requestAnimationFrame(() => editor.sync());
}

/** The "#n" (or "#n-m" for an Import node) chip of a region node: {label, color}, or null. */
function titleChip(node) {
    if (node.flags?.collapsed) return null;
    const own = chainRegions(node).filter((r) => r.node === node);
    if (!own.length) return null;
    const label = own.length === 1 ? `#${own[0].index}` : `#${own[0].index}-${own[own.length - 1].index}`;
    return { label, color: regionColor(own[0].index) };
}

/** The chip on the title bar the classic renderers draw (Nodes 2.0 does not call onDrawForeground). */
function drawTitleChip(node, ctx) {
    const chip = titleChip(node);
    if (!chip) return;
    const titleHeight = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    ctx.save();
    ctx.font = "bold 12px sans-serif";
    const tw = ctx.measureText(chip.label).width + 10;
    const x = node.size[0] - tw - 6, y = -titleHeight + 6;
    ctx.fillStyle = chip.color;
    ctx.beginPath();
    ctx.rect(x, y, tw, titleHeight - 12);
    ctx.fill();
    ctx.fillStyle = "#000";
    ctx.textBaseline = "middle";
    ctx.textAlign = "center";
    ctx.fillText(chip.label, x + tw / 2, y + (titleHeight - 12) / 2);
    ctx.restore();
}

app.registerExtension({
    name: EXTENSION,
    nodeCreated(node) {
        if (isRegionNode(node)) attachEditor(node);
    },
    loadedGraphNode(node) {
        node.mixofshowRegionEditor?.sync();
    },
});

// For tests and other tools: the editor of a node, and the pure helpers.
window.MixOfShowRegionEditor = {
    extension: EXTENSION,
    editorOf: (node) => node?.mixofshowRegionEditor ?? null,
    regionColor,
};
