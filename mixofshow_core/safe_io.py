"""Atomic writes and loads that never execute file content."""
import os
import tempfile
import zipfile
import pickle

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class UnreadableFileError(ValueError):
    """A file that cannot be read as plain tensors; the message names the file."""


def atomic_write(path, write):
    """Calls write(tmp_path) and renames the result over `path` only when it succeeded."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(tensors, path, metadata=None):
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def save_torch(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_safetensors(path):
    """(tensors, metadata) of a .safetensors file."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise UnreadableFileError(f"{os.path.basename(path)}: not a readable .safetensors file ({e})") from e


def read_torch_weights(path):
    """Loads a pickled checkpoint with torch.load(weights_only=True): data only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableFileError(
            f"{os.path.basename(path)}: not a plain tensor checkpoint (truncated, or it holds "
            f"objects other than tensors: {reason})") from e
