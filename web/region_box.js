// Box text <-> normalized box, mirroring mixofshow_core/regions.py (parse_box, parse_prompt_rewrite).
// Pure functions, no ComfyUI imports: the region editor (region_editor.js) and the browser tests use them.
//
// A normalized box is {x1, y1, x2, y2} with 0 <= x1 < x2 <= 1 across the width and
// 0 <= y1 < y2 <= 1 down the height, column first like the Region Prompt box widget.

export const UNITS = ["normalized", "pixels"];

const NUMBER = /^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$/;

export class BoxError extends Error {}

/** The numbers of "x1, y1, x2, y2" (commas or spaces, optional [..] or (..)), as regions.py reads them. */
export function parseNumbers(text) {
    let body = String(text ?? "").trim();
    if ("[(".includes(body[0] ?? "x") && body.length > 1 && "])".includes(body[body.length - 1])) {
        body = body.slice(1, -1).trim();
    }
    if (!body) return [];
    const parts = body.includes(",") ? body.split(",") : body.split(/\s+/);
    return parts.map((raw) => {
        const part = raw.trim();
        if (!NUMBER.test(part)) {
            if (/^[+-]?(inf(inity)?|nan)$/i.test(part)) throw new BoxError(`'${part}' is not a finite number`);
            throw new BoxError(`'${part}' is not a number`);
        }
        return Number(part);
    });
}

function checkSize(width, height) {
    if (!(width > 0 && height > 0)) throw new BoxError(`image size ${width}x${height} must be positive`);
}

function inFrame(x1, y1, x2, y2, width, height, unit) {
    for (const [name, value, limit] of [["x1", x1, width], ["y1", y1, height], ["x2", x2, width], ["y2", y2, height]]) {
        if (!(value >= 0 && value <= limit)) throw new BoxError(`${name} (${value}) must be within 0..${limit} ${unit}`);
    }
    if (x2 <= x1) throw new BoxError(`x2 (${x2}) must be greater than x1 (${x1})`);
    if (y2 <= y1) throw new BoxError(`y2 (${y2}) must be greater than y1 (${y1})`);
    return { x1: x1 / width, y1: y1 / height, x2: x2 / width, y2: y2 / height };
}

/** Normalized box of the Region Prompt "box" text; throws BoxError with the reason. */
export function parseBox(text, units, width, height) {
    if (!UNITS.includes(units)) throw new BoxError(`units '${units}' must be one of ${UNITS.join(", ")}`);
    const values = parseNumbers(text);
    if (values.length !== 4) throw new BoxError(`expected 4 values x1,y1,x2,y2, got ${values.length}`);
    const [x1, y1, x2, y2] = values;
    if (units === "normalized") return inFrame(x1, y1, x2, y2, 1, 1, "(normalized)");
    checkSize(width, height);
    return inFrame(x1, y1, x2, y2, width, height, `pixels of the ${width}x${height} image`);
}

/** {box} or {error} instead of throwing. */
export function tryParseBox(text, units, width, height) {
    try {
        return { box: parseBox(text, units, width, height) };
    } catch (error) {
        if (error instanceof BoxError) return { error: error.message };
        throw error;
    }
}

function trim(value, digits) {
    const text = Number(value).toFixed(digits);
    return text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
}

/** The box text for a normalized box in the given units: "0.125, 0.25, 0.75, 1" or "64, 128, 384, 512".
 *  Pixel boxes are rounded to whole pixels, normalized ones to 3 decimals; the result always parses. */
export function formatBox(box, units, width, height) {
    const clamp = (v) => Math.min(1, Math.max(0, v));
    let { x1, y1, x2, y2 } = box;
    [x1, x2] = [clamp(Math.min(x1, x2)), clamp(Math.max(x1, x2))];
    [y1, y2] = [clamp(Math.min(y1, y2)), clamp(Math.max(y1, y2))];
    if (units === "pixels") {
        checkSize(width, height);
        const edges = (a, b, size) => {
            let lo = Math.round(a * size), hi = Math.round(b * size);
            if (hi <= lo) {
                if (lo >= size) lo = size - 1;
                hi = lo + 1;
            }
            return [lo, hi];
        };
        const [px1, px2] = edges(x1, x2, width);
        const [py1, py2] = edges(y1, y2, height);
        return [px1, py1, px2, py2].join(", ");
    }
    const step = 0.001;
    const edges = (a, b) => {
        let lo = Math.round(a / step) * step, hi = Math.round(b / step) * step;
        if (hi <= lo) {
            if (lo >= 1) lo = 1 - step;
            hi = lo + step;
        }
        return [lo, hi];
    };
    const [nx1, nx2] = edges(x1, x2);
    const [ny1, ny2] = edges(y1, y2);
    return [nx1, ny1, nx2, ny2].map((v) => trim(v, 3)).join(", ");
}

export function fullBox() {
    return { x1: 0, y1: 0, x2: 1, y2: 1 };
}

export function isFullBox(box, eps = 1e-9) {
    return !!box && box.x1 <= eps && box.y1 <= eps && box.x2 >= 1 - eps && box.y2 >= 1 - eps;
}

/** The regions of the original's prompt_rewrite, '[prompt]-*-[negative]-*-[y1, x1, y2, x2]|...'
 *  (row-first pixels of width x height; '[]' is the whole image): [{prompt, box} or {prompt, error}]. */
export function parsePromptRewrite(text, width, height) {
    const source = String(text ?? "");
    if (!source.trim()) return [];
    const entries = source.split("|");
    if (!entries[entries.length - 1].trim()) entries.pop();
    return entries.map((entry) => {
        const parts = entry.split("-*-");
        const prompt = (parts[0] ?? "").replace(/[[\]]/g, "").trim();
        if (parts.length !== 3) return { prompt, error: `expected 3 parts, got ${parts.length}` };
        const boxText = parts[2].trim();
        try {
            if (!(boxText.startsWith("[") && boxText.endsWith("]"))) throw new BoxError("box must be [y1, x1, y2, x2]");
            const values = parseNumbers(boxText);
            if (!values.length) return { prompt, box: fullBox() };
            if (values.length !== 4) throw new BoxError(`expected 4 values, got ${values.length}`);
            checkSize(width, height);
            const [y1, x1, y2, x2] = values;
            return { prompt, box: inFrame(x1, y1, x2, y2, width, height, "pixels") };
        } catch (error) {
            if (error instanceof BoxError) return { prompt, error: error.message };
            throw error;
        }
    });
}
