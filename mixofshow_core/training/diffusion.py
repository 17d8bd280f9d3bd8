"""Diffusion training objective: DDPM noising, ε or v targets, the masked MSE (notes §1.4)."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """alphas_cumprod [T] of the model's discrete schedule; prediction "eps" or "v"."""
    alphas_cumprod: torch.Tensor
    prediction: str = "eps"

    @property
    def num_timesteps(self):
        return self.alphas_cumprod.shape[0]

    @classmethod
    def from_sigmas(cls, sigmas, prediction="eps"):
        """From k-diffusion sigmas σ_t = √((1 − ᾱ_t) / ᾱ_t): ᾱ_t = 1 / (1 + σ_t²)."""
        return cls(1.0 / (1.0 + sigmas.double() ** 2), prediction)

    def _scales(self, timesteps, like):
        alpha_bar = self.alphas_cumprod.to(like.device)[timesteps].to(like.dtype).reshape(-1, 1, 1, 1)
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def add_noise(self, latents, noise, timesteps):
        """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε."""
        signal, sigma = self._scales(timesteps, latents)
        return signal * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        """ε, or v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0."""
        if self.prediction == "eps":
            return noise
        signal, sigma = self._scales(timesteps, latents)
        return signal * noise - sigma * latents


def sample_noise(shape, offset, generator):
    """ε + offset · N(0, 1) per image and channel (the original's noise offset)."""
    noise = torch.randn(shape, generator=generator)
    return noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)


def masked_mse(prediction, target, mask):
    """mean_b[ Σ(mse · m) / Σ m ] with a 1-channel mask m broadcast over the latent channels.

    As in the original, the numerator sums all C channels while the denominator counts the
    mask once, so the loss is C (= 4) times the masked per-element mean. We keep that factor:
    AdamW is indifferent to it, but the attention regulariser's weight 0.01 was tuned
    against the ×4 loss."""
    error = (prediction.float() - target.float()) ** 2
    return ((error * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))).mean()
