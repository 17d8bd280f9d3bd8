"""Trainable LoRA on existing torch Linear / 1x1 Conv2d modules, attached by forward hooks.

y = W x + b + α · up(down(x)) (notes §1.3): down is Kaiming-uniform with a = √5, up starts at
zero, α is a constant and there is no division by rank. The wrapped modules are not changed;
removing the hooks restores them exactly.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one module: down [r, in(, 1, 1)], up [out, r(, 1, 1)]."""

    def __init__(self, in_features, out_features, rank, alpha=1.0, conv=False, generator=None):
        super().__init__()
        tail = (1, 1) if conv else ()
        self.conv = conv
        self.alpha = alpha
        self.down = torch.nn.Parameter(torch.empty((rank, in_features) + tail))
        self.up = torch.nn.Parameter(torch.zeros((out_features, rank) + tail))
        torch.nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)

    def forward(self, x):
        x = x.to(self.down.dtype)
        if self.conv:
            return self.alpha * F.conv2d(F.conv2d(x, self.down), self.up)
        return self.alpha * F.linear(F.linear(x, self.down), self.up)


def adapter_for(module, rank, alpha=1.0, generator=None):
    """A fresh adapter shaped for `module` (a Linear or a 1x1 Conv2d)."""
    if isinstance(module, torch.nn.Linear):
        adapter = LoRAAdapter(module.in_features, module.out_features, rank, alpha, False, generator)
    elif isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1):
        adapter = LoRAAdapter(module.in_channels, module.out_channels, rank, alpha, True, generator)
    else:
        raise TypeError(f"LoRA needs a Linear or a 1x1 Conv2d, got {type(module).__name__}")
    return adapter.to(module.weight.device)


def make_adapters(targets, rank, alpha=1.0, seed=0):
    """{name: adapter} for {name: module}, initialised from `seed` in name order."""
    generator = torch.Generator().manual_seed(seed)
    return {name: adapter_for(targets[name], rank, alpha, generator) for name in sorted(targets)}


@contextmanager
def attached(targets, adapters):
    """Adds adapters[name](x) to the output of targets[name] while the context is open."""
    handles = []
    try:
        for name, adapter in adapters.items():
            handles.append(targets[name].register_forward_hook(_adding(adapter)))
        yield adapters
    finally:
        for handle in handles:
            handle.remove()


def _adding(adapter):
    def hook(module, args, output):
        return output + adapter(args[0]).to(output.dtype)
    return hook
