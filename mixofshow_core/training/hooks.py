"""Train through host modules that were written for inference, without changing them.

Two host habits break autograd: blocks normalise x and then add into x in place
(`x += attn(norm(x))`) although the norm kept x for its backward, and callers mutate a
shared options dict (a layer counter) after a block returns, which a recomputation in
backward would then see. Both are handled here by copies, and every change is undone
when its context closes.
"""
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint


@contextmanager
def cloned_inputs(modules):
    """Each module receives its own copy of its first input (use on the norms)."""
    handles = [m.register_forward_pre_hook(_clone_first) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _clone_first(module, args):
    return (args[0].clone(),) + tuple(args[1:])


@contextmanager
def checkpointed(modules):
    """Gradient checkpointing of each module's forward: activations inside are recomputed in
    backward. Every run works on copies of the tensor and dict arguments as they were passed;
    the first run's dict changes are written back to the caller's dicts."""
    previous = [m.__dict__.get("forward") for m in modules]
    try:
        for module in modules:
            module.forward = _checkpointed(module.forward)
        yield
    finally:
        for module, forward in zip(modules, previous):
            module.__dict__.pop("forward", None)
            if forward is not None:
                module.forward = forward


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    return dict(value) if isinstance(value, dict) else value


def _checkpointed(forward):
    def run(*args, **kwargs):
        first_dicts = []

        def compute(*a, **k):
            a, k = tuple(_copy(x) for x in a), {n: _copy(v) for n, v in k.items()}
            if not first_dicts:
                first_dicts.append([x for x in list(a) + list(k.values()) if isinstance(x, dict)])
            return forward(*a, **k)

        frozen_args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        frozen_kwargs = {n: dict(v) if isinstance(v, dict) else v for n, v in kwargs.items()}
        output = checkpoint(compute, *frozen_args, use_reentrant=False, **frozen_kwargs)
        callers = [x for x in list(args) + list(kwargs.values()) if isinstance(x, dict)]
        for caller, used in zip(callers, first_dicts[0]):
            caller.update(used)
        return output
    return run
