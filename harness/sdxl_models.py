"""Seeded random models of the real SDXL topology (70 cross-attention transformer blocks in 11
spatial transformers, clip_l 768 + clip_g 1280 context, size-conditioned ADM), built with the
host's own SDXL classes (`supported_models.SDXL`, `model_base.SDXL`, `sdxl_clip`).

Needs ComfyUI on sys.path. Two sizes:
- `tiny_sdxl_model` / `tiny_sdxl_clip`: in-process MODEL/CLIP for unit tests (UNet widths 32/64/128,
  full-width 3-layer encoders with narrow MLPs: the context stays 2048 wide and the pooled output 1280).
- `write_sdxl_checkpoint`: a single-file checkpoint CheckpointLoaderSimple detects as SDXL. Detection
  needs model_channels 320, transformer depths [0, 0, 2, 2, 10, 10], context 2048 and ADM 2816; the
  channel multipliers are not checked, so every level stays 320 wide. The host always builds the
  full-size clip_l and clip_g, so the file carries full encoders (about 1.9 GB at float16).
"""
import inspect
import json
import os
import tempfile

import torch

from .models import TINY_CLIP, seeded_state

TINY_SDXL_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                      num_classes="sequential", adm_in_channels=2816, in_channels=4, out_channels=4,
                      model_channels=32, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                      transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                      transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True,
                      use_temporal_resblock=False, use_temporal_attention=False)
CHECKPOINT_SDXL_UNET = dict(TINY_SDXL_UNET, model_channels=320, channel_mult=[1, 1, 1])
TINY_CLIP_L = dict(TINY_CLIP, num_hidden_layers=3, intermediate_size=512)
TINY_CLIP_G = dict(TINY_CLIP, hidden_act="gelu", hidden_size=1280, intermediate_size=512, num_attention_heads=20,
                   num_hidden_layers=3, projection_dim=1280, bos_token_id=0)


def _sdxl_unet(config, seed):
    import comfy.model_base
    import comfy.supported_models
    model_config = comfy.supported_models.SDXL(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.SDXL(model_config, device="cpu")
    model.load_state_dict(seeded_state(model.state_dict(), seed), strict=True)
    return model


def sdxl_model(config, seed=0):
    """MODEL: a ModelPatcher over a seeded SDXL-topology UNet of `config`."""
    import comfy.model_patcher
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(_sdxl_unet(config, seed), load_device=cpu, offload_device=cpu)


def tiny_sdxl_model(seed=0):
    """MODEL: SDXL topology (70 attn2 blocks), widths 32/64/128, context 2048, ADM 2816."""
    return sdxl_model(TINY_SDXL_UNET, seed)


def _write_json(folder, name, data):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _tiny_sdxl_clip_class(config_l, config_g):
    """The host's SDXLClipModel with both encoders built from small configs (its own __init__ always
    loads the full-size ones): clip_l and clip_g exactly as the host configures them otherwise."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    takes_options = "model_options" in inspect.signature(comfy.sd1_clip.SDClipModel.__init__).parameters

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            l_options = {"model_options": model_options} if takes_options else {}
            g_options = {"model_options": {**model_options, "model_name": "clip_g"}} if takes_options else {}
            self.clip_l = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=config_l, **l_options)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=config_g, special_tokens={"start": 49406, "end": 49407, "pad": 0},
                return_projected_pooled=True, **g_options)
            self.dtypes = {dtype}
    return TinySDXLClipModel


def tiny_sdxl_clip(seed=1):
    """CLIP: clip_l (768) + clip_g (1280), 3 layers each, penultimate outputs, the host's SDXL tokenizer."""
    import comfy.sd
    import comfy.sdxl_clip
    folder = tempfile.mkdtemp(prefix="mixofshow-sdxl-clip-")

    class Target:
        clip = _tiny_sdxl_clip_class(_write_json(folder, "clip_l.json", TINY_CLIP_L),
                                     _write_json(folder, "clip_g.json", TINY_CLIP_G))
        tokenizer = comfy.sdxl_clip.SDXLTokenizer
        params = {}
    clip = comfy.sd.CLIP(Target)
    state = clip.cond_stage_model.state_dict()
    clip.cond_stage_model.load_state_dict(seeded_state(state, seed), strict=True)
    return clip


def sdxl_checkpoint_state(seed=0, dtype=torch.float16):
    """ldm single-file state dict of the detectable SDXL checkpoint, laid out by the host's own
    state_dict_for_saving (so clip_g is in OpenCLIP layout, as real SDXL files are)."""
    import comfy.model_base
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    # built on the meta device and given seeded `dtype` weights: no float32 copy of the ~1 B parameters
    model_config = comfy.supported_models.SDXL(dict(CHECKPOINT_SDXL_UNET))
    model_config.set_inference_dtype(dtype, None)
    unet = comfy.model_base.SDXL(model_config, device="meta")
    unet.load_state_dict(seeded_state(unet.state_dict(), seed, dtype), strict=True, assign=True)
    clip = seeded_state(comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float32).state_dict(), seed + 1, dtype)
    vae = seeded_state(comfy.taesd.taesd.TAESD().state_dict(), seed + 2, dtype)
    return unet.state_dict_for_saving(clip, vae)


def write_sdxl_checkpoint(path, seed=0):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sdxl_checkpoint_state(seed), path)
    return path
