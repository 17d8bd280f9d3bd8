"""Progress and interrupt for long nodes (fuse, train, sample)."""
import time

import comfy.model_management
import comfy.utils

from .compat import progress_text

MIN_TEXT_INTERVAL = 0.25   # seconds between status texts while the stage stays the same


def remaining_text(done, total, elapsed):
    if done <= 0 or done >= total:
        return ""
    seconds = elapsed / done * (total - done)
    return f", about {seconds:.0f} s left" if seconds < 90 else f", about {seconds / 60:.0f} min left"


class Progress:
    """comfy.utils.ProgressBar that honours the interrupt button at every step and shows on the node
    where the work is (stage, concept, step, layer) with a rough time left."""

    def __init__(self, total):
        self.total = max(int(total), 1)
        self.bar = comfy.utils.ProgressBar(self.total)
        self.done, self.where, self.started, self.shown = 0, "", time.monotonic(), 0.0

    def at(self, where):
        """Names what runs now, e.g. 'UNet layers: concept 2/3, sampling step 4/20'."""
        changed, self.where = where != self.where, where
        self._show(force=changed)

    def step(self, count=1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done += count
        self.bar.update(count)
        self._show(force=self.done >= self.total)

    def status(self):
        elapsed = time.monotonic() - self.started
        return f"{self.where} ({self.done}/{self.total}{remaining_text(self.done, self.total, elapsed)})"

    def _show(self, force):
        now = time.monotonic()
        if force or now - self.shown >= MIN_TEXT_INTERVAL:
            self.shown = now
            progress_text(self.status())
