"""Atomic writes and loads that never execute file content.

A save writes `.<name>.partial-XXXXXXXX` beside its target (no extension ComfyUI lists, so model
lists never offer it) and renames it over the target once complete. The safetensors library
itself writes through its own `.tmpXXXXXX` file in the same folder. remove_partial_files deletes
both kinds (and the `.tmp-XXXXXXXX.<ext>` names older versions used) when a killed save left them.
"""
import hashlib
import os
import pickle
import re
import tempfile
import time
import zipfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


PARTIAL_FILE = re.compile(r"\..+\.partial-[a-z0-9_]{8}"    # ours
                          r"|\.tmp[A-Za-z0-9]{6}"             # the safetensors library's
                          r"|\.tmp-[a-z0-9_]{8}\.(safetensors|pth|pt|fusionstats)")  # ours before
LEFTOVER_AGE_S = 600  # younger temp files may belong to a save still running in another process


class UnreadableFileError(ValueError):
    """A file that cannot be read as plain tensors; the message names the file."""


class NonFiniteError(ValueError):
    """Tensors about to be written hold NaN or inf; the message names the file and tensor."""


def _process_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _process_umask()   # read once at import: os.umask can only be read by setting it


def atomic_write(path, write):
    """Calls write(tmp_path) and renames the result over `path` only when it succeeded."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", suffix="", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 would make outputs private to this user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_partial_files(folders, min_age_s=LEFTOVER_AGE_S):
    """Deletes leftover temp files (see the module doc) under `folders`; returns their paths."""
    removed, now = [], time.time()
    for top in folders:
        for folder, _, names in os.walk(top):
            for name in names:
                path = os.path.join(folder, name)
                if PARTIAL_FILE.fullmatch(name) and _age_s(path, now) >= min_age_s:
                    os.remove(path)
                    removed.append(path)
    return removed


def _age_s(path, now):
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return -1


def check_finite(tensors, path):
    """Raises NonFiniteError naming `path` when a floating-point tensor holds NaN or inf."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{os.path.basename(path)}: not written, tensor {key} contains NaN or inf")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def save_safetensors(tensors, path, metadata=None):
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def save_torch(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_safetensors(path):
    """(tensors, metadata) of a .safetensors file."""
    metadata = read_safetensors_metadata(path)
    try:
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise UnreadableFileError(f"{os.path.basename(path)}: not a readable .safetensors file ({e})") from e


def read_safetensors_metadata(path):
    """The metadata dict of a .safetensors file (its header only)."""
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
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
