"""What the fusion tests and the fusion benchmark measure on the harness models: seeded concepts,
the capture-style sampling run on which gradient fusion promises each concept its own layer
outputs, and the relative error of one run against another. Needs ComfyUI on sys.path."""
import comfy.model_management
import comfy.sample
import torch

from ..nodes.edlora_concept import Concept
from ..nodes.edlora_text_encode import encode_layerwise
from .edlora_fixtures import model_lora_shapes, random_edlora

CAPTURE = dict(capture_steps=2, capture_resolution=64, seed=7)


def concept_words(index):
    """<a1> <a2> for concept 0, <b1> <b2> for concept 1, ..."""
    letter = chr(ord("a") + index)
    return [f"<{letter}1>", f"<{letter}2>"]


def seeded_concepts(model, clip, count):
    """`count` seeded random ED-LoRAs shaped for model/clip, as Concepts at α 1."""
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    return [Concept(random_edlora(concept_words(i), unet_shapes, text_shapes, seed=20 + i, embedding_scale=0.3,
                                  text_lora_scale=0.05, name=f"concept{i}.safetensors"), 1.0, 1.0)
            for i in range(count)]


def loaded_weights(patcher):
    """A copy of the patcher's weights with its patches applied."""
    comfy.model_management.load_models_gpu([patcher])
    return {k: v.clone() for k, v in patcher.model.state_dict().items()}


def capture_sample(model, clip, words, index=0):
    """The sampling run fusion records for concept `index` (its prompt, seed + index, steps, size,
    no CFG): the inputs on which gradient fusion promises each concept its own layer outputs."""
    cond = encode_layerwise(clip, f"photo of a {' '.join(words)}")
    size, seed = CAPTURE["capture_resolution"] // 8, CAPTURE["seed"] + index
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, size, size), seed)
    return comfy.sample.sample(model, noise, CAPTURE["capture_steps"], 1.0, "dpmpp_2m", "normal", cond, cond,
                               torch.zeros_like(noise), seed=seed, disable_pbar=True)


def relative_error(a, b, base):
    """‖a − b‖ / ‖b − base‖: a's distance from b relative to what b changes from base."""
    return float((a - b).norm() / (b - base).norm())
