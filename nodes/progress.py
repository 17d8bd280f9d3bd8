"""Progress and interrupt for long nodes (fuse, train, sample)."""
import comfy.model_management
import comfy.utils


class Progress:
    """comfy.utils.ProgressBar that also honours the interrupt button at every step."""

    def __init__(self, total):
        self.bar = comfy.utils.ProgressBar(max(int(total), 1))

    def step(self, count=1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update(count)
