"""ComfyUI's interrupt as each host raises it, for the in-process tests.

The hosts here raise `comfy.model_management.InterruptProcessingException` (an Exception) from
the server's progress hook (main.py hijack_progress) and from sampler callbacks. ComfyUI 0.38
defines it as a BaseException and also raises it at the start of every op's forward
(comfy/ops.py run_every_op); both clear the interrupt flag as they raise.
"""
import comfy.model_management
import comfy.ops

OPS = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")  # the op classes both hosts here define


class CurrentInterrupt(BaseException):
    """ComfyUI 0.38's InterruptProcessingException."""


def server_progress_hook(interrupt_at):
    """The server's progress hook, with the interrupt button pressed just before the progress
    bar reports value `interrupt_at`: it raises before it reports anything, as the real one does."""
    def hook(value, total, preview_image, prompt_id=None, node_id=None):  # current hosts pass ids
        if value == interrupt_at:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return hook


def _checked(forward):
    def run_every_op_then_forward(self, *args, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        return forward(self, *args, **kwargs)
    return run_every_op_then_forward


def raise_in_every_op(monkeypatch):
    """Makes the host interrupt as ComfyUI 0.38 does: a BaseException, raised (clearing the flag)
    at the start of every op of comfy.ops (manual_cast's ops inherit these forwards)."""
    monkeypatch.setattr(comfy.model_management, "InterruptProcessingException", CurrentInterrupt)
    for name in OPS:
        op = getattr(comfy.ops.disable_weight_init, name)
        monkeypatch.setattr(op, "forward", _checked(op.forward))


def hooked_modules(module):
    """Names of submodules carrying hooks or an instance forward: an interrupted node may leave none."""
    return [name for name, m in module.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or "forward" in m.__dict__]


def press_interrupt_on_call(monkeypatch, owner, name, call):
    """Presses the interrupt button when owner.name is called for the `call`-th time (1-based);
    the next op then raises."""
    original, calls = getattr(owner, name), []

    def counted(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            comfy.model_management.interrupt_current_processing(True)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return calls
