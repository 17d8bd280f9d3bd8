"""Seeded random models of the real SD1.5 topology (16 cross-attention layers), built with
the host's own classes so key names and shapes are exactly what ComfyUI expects.

Needs ComfyUI on sys.path. Two sizes:
- `tiny`: in-process MODEL/CLIP/VAE for unit tests (UNet 32 channels, 2-layer 768-wide CLIP).
- `checkpoint`: a single-file checkpoint CheckpointLoaderSimple detects as SD1.5
  (model_channels 320 and context 768 as detection requires, one channel level, full CLIP
  because the host always builds the full text model, TAESD as the VAE).
"""
import json
import math
import os
import tempfile

import torch

TINY_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, out_channels=4, model_channels=32,
                 num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                 use_temporal_resblock=False, use_temporal_attention=False)
CHECKPOINT_UNET = dict(TINY_UNET, model_channels=320, channel_mult=[1, 1, 1, 1])
TINY_CLIP = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
             "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
             "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 2,
             "projection_dim": 768, "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407,
             "pad_token_id": 1, "torch_dtype": "float32"}


def seeded_state(state, seed, dtype=torch.float32):
    """Deterministic weights for a state dict: N(0, 1/fan_in) matrices, unit norms, zero biases,
    N(0, 0.02) embeddings (the host's ops skip weight init, so every tensor must be set). Only
    shapes are read, so `state` may hold meta tensors; floating-point values come out in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(state):
        value = state[key]
        if not value.is_floating_point():
            out[key] = value.clone()
        elif "norm" in key and key.endswith("weight") or key.endswith("logit_scale") or "vae_scale" in key:
            out[key] = torch.ones(value.shape, dtype=dtype)
        elif key.endswith("bias") or "vae_shift" in key:
            out[key] = torch.zeros(value.shape, dtype=dtype)
        elif "embedding" in key:
            out[key] = (torch.randn(value.shape, generator=generator) * 0.02).to(dtype)
        else:
            fan_in = math.prod(value.shape[1:]) if value.dim() > 1 else value.shape[0]
            out[key] = (torch.randn(value.shape, generator=generator) / math.sqrt(fan_in)).to(dtype)
    return out


def _unet(config, seed):
    import comfy.model_base
    import comfy.supported_models
    model_config = comfy.supported_models.SD15(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(model_config, device="cpu")
    model.load_state_dict(seeded_state(model.state_dict(), seed), strict=True)
    return model


def _clip_target(config_path):
    import comfy.sd1_clip

    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": config_path}
    return Target


def unet_model(config, seed=0):
    """MODEL: a ModelPatcher over a seeded SD1.5-topology UNet of `config` (TINY_UNET, CHECKPOINT_UNET)."""
    import comfy.model_patcher
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(_unet(config, seed), load_device=cpu, offload_device=cpu)


def tiny_model(seed=0):
    """MODEL: a ModelPatcher over a 32-channel SD1.5-topology UNet with 768-wide context."""
    return unet_model(TINY_UNET, seed)


def tiny_clip(seed=1):
    """CLIP: 768-wide, 2-layer clip_l with the host's SD1 tokenizer."""
    import comfy.sd
    folder = tempfile.mkdtemp(prefix="mixofshow-clip-")
    config_path = os.path.join(folder, "tiny_clip.json")
    with open(config_path, "w") as f:
        json.dump(TINY_CLIP, f)
    clip = comfy.sd.CLIP(_clip_target(config_path))
    state = clip.cond_stage_model.state_dict()
    clip.cond_stage_model.load_state_dict(seeded_state(state, seed), strict=True)
    return clip


def tiny_vae(seed=2):
    """VAE: TAESD (the host switches to it when taesd keys are present)."""
    import comfy.sd
    import comfy.taesd.taesd
    return comfy.sd.VAE(sd=seeded_state(comfy.taesd.taesd.TAESD().state_dict(), seed))


def checkpoint_state(seed=0, dtype=torch.float16):
    """ldm single-file state dict of the detectable SD1.5-topology checkpoint."""
    import comfy.sd1_clip
    import comfy.taesd.taesd
    state = {}
    unet = _unet(CHECKPOINT_UNET, seed).state_dict()
    state.update({"model." + k: v for k, v in unet.items()})
    clip = seeded_state(comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32).state_dict(), seed + 1)
    state.update({"cond_stage_model." + k[len("clip_l."):]: v for k, v in clip.items() if k.startswith("clip_l.")})
    vae = seeded_state(comfy.taesd.taesd.TAESD().state_dict(), seed + 2)
    state.update({"first_stage_model." + k: v for k, v in vae.items()})
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def write_checkpoint(path, seed=0):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(checkpoint_state(seed), path)
    return path


def t2i_adapter_state(seed=3, channel=32, image_channels=3):
    """A seeded T2I-Adapter (keypose style for image_channels 3, sketch for 1) whose feature
    widths [c, 2c, 4c, 4c] match a UNet with model_channels c and channel_mult [1, 2, 4, 4]."""
    import comfy.t2i_adapter.adapter
    adapter = comfy.t2i_adapter.adapter.Adapter(cin=image_channels * 64, channels=[channel, channel * 2, channel * 4, channel * 4],
                                                nums_rb=2, ksize=1, sk=True, use_conv=False, xl=False)
    return seeded_state(adapter.state_dict(), seed)


def write_t2i_adapter(path, seed=3, channel=32, image_channels=3):
    """Writes a T2I-Adapter file that ComfyUI's ControlNetLoader loads (comfy.controlnet.load_controlnet)."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(t2i_adapter_state(seed, channel, image_channels), path)
    return path


def controlnet_state(seed=4, config=CHECKPOINT_UNET, hint_channels=3):
    """A seeded ControlNet (ldm layout, as ControlNetLoader reads it) for a UNet of `config`.

    ComfyUI's T2I-Adapter loader only builds adapters of widths [c, 2c, 4c, 4c], which a UNet
    with 320 channels at every level (CHECKPOINT_UNET) cannot take; a ControlNet is built from
    the UNet's own config, so it fits, and goes through the same ControlNetLoader /
    ControlNetApplyAdvanced nodes."""
    import comfy.cldm.cldm
    unet_config = {k: v for k, v in config.items() if k != "out_channels"}
    controlnet = comfy.cldm.cldm.ControlNet(**unet_config, hint_channels=hint_channels, num_heads=8)
    return seeded_state(controlnet.state_dict(), seed)


def write_controlnet(path, seed=4, config=CHECKPOINT_UNET, hint_channels=3):
    """Writes a fp16 ControlNet file that ComfyUI's ControlNetLoader loads."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = controlnet_state(seed, config, hint_channels)
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}, path)
    return path
