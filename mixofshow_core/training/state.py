"""Resumable training state: tensors in a .safetensors file, everything else as JSON in its
metadata. No pickle: the file holds data only."""
import json

from ..safe_io import UnreadableFileError, read_safetensors, save_safetensors

STATE_KEY = "mixofshow.training_state"
STATE_FORMAT = 1


class TrainingStateError(ValueError):
    """A training state that cannot be resumed; the message names the file."""


def save_training_state(path, tensors, info):
    save_safetensors(tensors, path, {STATE_KEY: json.dumps({"format": STATE_FORMAT, **info})})


def load_training_state(path):
    """(tensors, info) of a state written by save_training_state."""
    try:
        tensors, metadata = read_safetensors(path)
    except UnreadableFileError as e:
        raise TrainingStateError(str(e)) from e
    if STATE_KEY not in metadata:
        raise TrainingStateError(f"{path}: not an EDLoRA training state (no {STATE_KEY} metadata)")
    info = json.loads(metadata[STATE_KEY])
    if info.get("format") != STATE_FORMAT:
        raise TrainingStateError(f"{path}: training state format {info.get('format')} is not supported "
                                 f"(this plugin reads {STATE_FORMAT})")
    return tensors, info
