"""The loss curve as an RGB image (PIL only): raw loss, its moving average, and a caption."""
import numpy as np
from PIL import Image, ImageDraw

MARGIN = 40


def moving_average(values, beta=0.9):
    """Bias-corrected exponential moving average."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = beta * average + (1 - beta) * v
        out.append(average / (1 - beta ** i))
    return out


def loss_curve(losses, total_steps, width=512, height=320, caption=""):
    """[height, width, 3] float array in [0, 1]."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, 20, width - 10, height - MARGIN
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0

        def point(i, v):
            x = left + (right - left) * (i + 1) / max(total_steps, len(losses))
            return x, bottom - (bottom - top) * (v - low) / span

        for values, colour, line_width in ((losses, (170, 200, 235), 1), (moving_average(losses), (20, 70, 160), 2)):
            points = [point(i, v) for i, v in enumerate(values)]
            draw.line(points if len(points) > 1 else points * 2, fill=colour, width=line_width)
        draw.text((4, top), f"{high:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
    draw.text((left, bottom + 6), f"step {len(losses)}/{total_steps}", fill="black")
    draw.text((left, bottom + 20), caption or "loss (light: per step, dark: moving average)", fill="black")
    return np.asarray(image, np.float32) / 255.0
