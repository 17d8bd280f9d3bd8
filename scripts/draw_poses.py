"""Draws the stick-figure keypose images of the regional workflows (PIL only, no third-party images).

    python scripts/draw_poses.py [--out workflows/poses]

OpenPose-style (COCO 18 keypoints, the usual limb colours) on black, 1024x512 like the
original's condition images, with 2 and 3 people side by side. Prints each person's box
(x1, y1, x2, y2 pixels), the boxes the workflows' Region Prompt nodes use.
"""
import argparse
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 1024, 512
ROOT = Path(__file__).resolve().parents[1]

# keypoints (x, y) in units of the figure's height, x from its centre line, y from its top;
# order: nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle,
# left hip/knee/ankle, right eye, left eye, right ear, left ear (the person's right is image left)
STANDING = [(0, .08), (0, .18), (-.09, .18), (-.12, .33), (-.13, .47), (.09, .18), (.12, .33), (.13, .47),
            (-.055, .5), (-.06, .72), (-.065, .94), (.055, .5), (.06, .72), (.065, .94),
            (-.025, .06), (.025, .06), (-.05, .075), (.05, .075)]
ARM_CHANGES = {
    "standing": {},
    "waving": {3: (-.17, .1), 4: (-.15, -.02)},
    "hands_on_hips": {3: (-.17, .31), 4: (-.06, .46), 6: (.17, .31), 7: (.06, .46)},
    "arms_out": {3: (-.2, .21), 4: (-.3, .19), 6: (.2, .21), 7: (.3, .19)},
}
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
SCENES = {
    "two_people_keypose.png": [(0.27, "waving"), (0.73, "hands_on_hips")],
    "three_people_keypose.png": [(1 / 6, "arms_out"), (0.5, "standing"), (5 / 6, "waving")],
}
FIGURE_HEIGHT, FIGURE_TOP = 460, 26
BOX_MARGIN = 40


def keypoints(centre_x, pose):
    points = [ARM_CHANGES[pose].get(i, point) for i, point in enumerate(STANDING)]
    return [(centre_x * WIDTH + x * FIGURE_HEIGHT, FIGURE_TOP + y * FIGURE_HEIGHT) for x, y in points]


def draw_figure(draw, points):
    for (a, b), colour in zip(LIMBS, COLOURS):
        draw.line([points[a], points[b]], fill=tuple(int(c * 0.6) for c in colour), width=8)
    for (x, y), colour in zip(points, COLOURS):
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)


def person_box(points):
    """(x1, y1, x2, y2) pixels around a figure with a margin, down to the bottom edge (the ground)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (max(0, round(min(xs)) - BOX_MARGIN), max(0, round(min(ys)) - BOX_MARGIN),
            min(WIDTH, round(max(xs)) + BOX_MARGIN), HEIGHT)


def draw_scene(people):
    """(image, [box per person]) for [(centre x as a fraction of the width, pose name)]."""
    image = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(image)
    boxes = []
    for centre_x, pose in people:
        points = keypoints(centre_x, pose)
        draw_figure(draw, points)
        boxes.append(person_box(points))
    return image, boxes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "workflows" / "poses"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, people in SCENES.items():
        image, boxes = draw_scene(people)
        image.save(out / name, optimize=True)
        print(f"{out / name}: " + " | ".join(", ".join(map(str, box)) for box in boxes))


if __name__ == "__main__":
    main()
