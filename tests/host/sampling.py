"""Runs one denoising evaluation through ComfyUI's real sampling path and records it."""
import comfy.sample
import comfy.samplers
import torch


def denoise_once(model, positive, negative, cfg, batch=1, size=8, t=500, seed=0):
    """(x the model saw, denoised prediction, sigma) for one sampler step at timestep t.

    A one-step custom sampler goes through comfy.sample.sample_custom, so conds are converted,
    batched (cond and uncond together when possible), CFG-combined and routed exactly as any
    stock sampler node does."""
    sigma = model.model.model_sampling.sigmas[t].item()
    recorded = {}

    def record(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        recorded["x"] = x.clone()
        recorded["denoised"] = model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return recorded["denoised"]

    noise = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))
    latent = torch.zeros_like(noise)
    comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(record), torch.tensor([sigma, 0.0]),
                               positive, negative, latent, seed=seed, disable_pbar=True)
    return recorded["x"], recorded["denoised"], sigma



def c_in(sigma):
    """Input scaling of an epsilon-prediction model, 1/sqrt(σ² + 1)."""
    return 1.0 / (sigma ** 2 + 1.0) ** 0.5
