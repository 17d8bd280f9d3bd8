"""The plugin's folders, the checks every path-like and name-like input passes, and file
fingerprints for ComfyUI's change detection.

Path inputs resolve inside one ComfyUI folder (symlinks resolved first); anything else gets the
same error whether or not it exists, so a prompt learns nothing about the outside file system.
"""
import hashlib
import os
import re

import folder_paths

from ..mixofshow_core.messages import excerpt
from ..mixofshow_core.safe_io import remove_partial_files

EDLORA_FOLDER = "edlora"
EDLORA_EXTENSIONS = {".safetensors", ".pth", ".pt"}
STATE_FOLDER = "edlora_training"
NAME_PART = re.compile(r"[\w\-. ]+")
MAX_NAME_BYTES = 100


class UnsafePathError(ValueError):
    """A path input that does not resolve inside its ComfyUI folder."""


def register_model_folders():
    """Registers models/edlora in both hosts, keeping paths an extra_model_paths.yaml added, and
    creates it if missing so that users see where ED-LoRA files go."""
    default = os.path.join(folder_paths.models_dir, EDLORA_FOLDER)
    os.makedirs(default, exist_ok=True)
    paths, _ = folder_paths.folder_names_and_paths.get(EDLORA_FOLDER, ([], set()))
    if default not in paths:
        paths = list(paths) + [default]
    folder_paths.folder_names_and_paths[EDLORA_FOLDER] = (paths, EDLORA_EXTENSIONS)


def written_folders():
    """Every folder the plugin saves into: models/edlora, models/checkpoints, the training states."""
    return (folder_paths.get_folder_paths(EDLORA_FOLDER) + folder_paths.get_folder_paths("checkpoints")
            + [training_state_root()])


def remove_leftovers():
    """Deletes the temporary files of saves killed before they finished (run at plugin load)."""
    return remove_partial_files(written_folders())


def training_state_root():
    return os.path.join(folder_paths.get_output_directory(), STATE_FOLDER)


def inside(root, value, input_name, folder_label, base=None):
    """The real path of `value` (relative to `base`, default `root`), refused unless it lies in `root`."""
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base or root, value))
    if os.path.commonpath([root, path]) != root:
        raise UnsafePathError(f"{input_name} {excerpt(value)}: must be a path inside {folder_label} "
                              f"(relative, without '..' or links leading out of it)")
    return path


def input_folder(value, input_name):
    """'' for an empty input, else the folder `value` names inside ComfyUI's input folder."""
    value = value.strip()
    return inside(folder_paths.get_input_directory(), value, input_name, "ComfyUI's input folder") if value else ""


def check_output_name(value, input_name, subfolders=False):
    """Raises ValueError unless `value` is a safe file name (with '/'-separated subfolders if allowed)."""
    parts = value.split("/") if subfolders else [value]
    if len(value.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{input_name} {excerpt(value)}: longer than {MAX_NAME_BYTES} bytes")
    for part in parts:
        if not NAME_PART.fullmatch(part) or part != part.strip() or part.startswith("."):
            allowed = "letters, digits, spaces, '-', '_', '.'" + (" and '/' between folders" if subfolders else "")
            raise ValueError(f"{input_name} {excerpt(value)}: use {allowed} only; no leading or trailing "
                             f"spaces or line breaks, and no part may start with '.'")


def validate_output_name(output_name):
    """VALIDATE_INPUTS answer for a node's output_name: True, or the error text (None: linked, checked at run)."""
    if output_name is None:
        return True
    try:
        check_output_name(output_name, "output_name")
    except ValueError as e:
        return str(e)
    return True


def file_fingerprint(path):
    """Changes when the file changes: size, mtime and a hash of its first MiB."""
    if path is None or not os.path.isfile(path):
        return float("nan")  # NaN != NaN: always re-run, the node reports the missing file
    stat = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{head}"


class WrittenFiles:
    """Fingerprints of the files this process wrote, so a cached node can tell that its output is
    gone or replaced (its cache key must be the same before and after the run that wrote it)."""

    def __init__(self):
        self.fingerprints = {}

    def record(self, path):
        self.fingerprints[os.path.realpath(path)] = file_fingerprint(path)

    def intact(self, path):
        """False once a file recorded here was deleted or changed by someone else."""
        recorded = self.fingerprints.get(os.path.realpath(path))
        return recorded is None or recorded == file_fingerprint(path)
