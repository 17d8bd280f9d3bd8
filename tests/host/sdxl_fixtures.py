"""Shared pytest fixtures on the tiny SDXL models and seeded SDXL ED-LoRAs (import them by name)."""
import pytest
import torch

from comfyui_mixofshow.harness import sdxl_models
from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.mixofshow_core.families import SDXL


@pytest.fixture(scope="session")
def base_sdxl_model():
    with torch.inference_mode():
        return sdxl_models.tiny_sdxl_model()


@pytest.fixture(scope="session")
def base_sdxl_clip():
    with torch.inference_mode():
        return sdxl_models.tiny_sdxl_clip()


@pytest.fixture
def sdxl_model(base_sdxl_model):
    return base_sdxl_model.clone()


@pytest.fixture
def sdxl_clip(base_sdxl_clip):
    return base_sdxl_clip.clone()


def sdxl_edlora(model, clip, words, granularity, seed=3, **kwargs):
    """A seeded SDXL ED-LoRA shaped for the tiny SDXL model: LoRA on the UNet attention and on
    both encoders' self-attention, rows at `granularity`."""
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    text_shapes_2 = model_lora_shapes(model, clip, "text_encoder_2")[1]
    return random_edlora(words, unet_shapes, text_shapes, seed=seed, family=SDXL, granularity=granularity,
                         text_shapes_2=text_shapes_2, **kwargs)
