"""The models/edlora folder and file fingerprints for ComfyUI's change detection."""
import hashlib
import os

import folder_paths

EDLORA_FOLDER = "edlora"
EDLORA_EXTENSIONS = {".safetensors", ".pth", ".pt"}


def register_model_folders():
    """Registers models/edlora in both hosts, keeping paths an extra_model_paths.yaml added, and
    creates it if missing so that users see where ED-LoRA files go."""
    default = os.path.join(folder_paths.models_dir, EDLORA_FOLDER)
    os.makedirs(default, exist_ok=True)
    paths, _ = folder_paths.folder_names_and_paths.get(EDLORA_FOLDER, ([], set()))
    if default not in paths:
        paths = list(paths) + [default]
    folder_paths.folder_names_and_paths[EDLORA_FOLDER] = (paths, EDLORA_EXTENSIONS)


def file_fingerprint(path):
    """Changes when the file changes: size, mtime and a hash of its first MiB."""
    if path is None or not os.path.isfile(path):
        return float("nan")  # NaN != NaN: always re-run, the node reports the missing file
    stat = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{head}"
