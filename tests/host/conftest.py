"""In-process ComfyUI host for tests: the embedded copy, or MIXOFSHOW_COMFYUI's checkout."""
import importlib.util
import sys

import pytest
import torch

from comfyui_mixofshow.harness import host

host.add_host_to_path()
PLUGIN = sys.modules["comfyui_mixofshow"]
if not hasattr(PLUGIN, "WEB_DIRECTORY"):
    _spec = importlib.util.spec_from_file_location(
        "comfyui_mixofshow", host.ROOT / "__init__.py", submodule_search_locations=[str(host.ROOT)])
    PLUGIN.__spec__ = _spec
    _spec.loader.exec_module(PLUGIN)

from comfyui_mixofshow.harness import models  # noqa: E402


@pytest.fixture(autouse=True)
def _inference_mode():
    """Nodes run inside torch.inference_mode() in ComfyUI's executor; tests do the same."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def base_model():
    with torch.inference_mode():
        return models.tiny_model()


@pytest.fixture(scope="session")
def base_clip():
    with torch.inference_mode():
        return models.tiny_clip()


@pytest.fixture
def model(base_model):
    return base_model.clone()


@pytest.fixture
def clip(base_clip):
    return base_clip.clone()
