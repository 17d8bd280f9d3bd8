"""Single-client ED-LoRA training (notes §1): the optimisation loop around injected model
callables, so the same loop trains host models and plain-torch test models.

Randomness is derived from (seed, step): the batch order, crops, caption shuffles, noise and
timesteps of step s are the same whether training ran straight through or was resumed, so a
resumed run reproduces an uninterrupted one.
"""
import math
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .attention import AttentionProbe, attention_regularisation
from .diffusion import NoiseSchedule, masked_mse, sample_noise
from .embeddings import mean_row_norm
from .state import TrainingStateError
from .transforms import (apply_template, bind_placeholder, image_tensor, place_on_canvas, shuffle_caption,
                         to_latent_size)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainingConfig:
    total_steps: int
    words: tuple = ("<concept1>", "<concept2>")
    placeholder: str = "<TOK>"
    batch_size: int = 2
    resolution: int = 512
    lr_embedding: float = 1e-3
    lr_text_lora: float = 1e-5
    lr_unet_lora: float = 1e-4
    weight_decay: float = 0.01
    noise_offset: float = 0.01
    masked_loss: bool = True
    attn_reg_weight: float = 0.01
    reg_full_identity: bool = False
    emb_norm_threshold: float = 0.55
    caption_template: str = "human"
    shuffle_caption: bool = True
    crop_p: float = 0.5
    seed: int = 0
    mixed_precision: str = "no"   # "no", "fp16" or "bf16" autocast

    def fingerprint(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class TrainingModel:
    """The model as the loop sees it.

    encode_images(images [B, 3, R, R] in [0, 1]) -> latents in model space (no gradient needed)
    encode_text(prompts, tables {word: [rows, D]}) -> (contexts, positions [B, n_words]: the token
        index of each concept word in the prompt); contexts is whatever predict reads (SD1.5: the
        [B, 16, T, D] per-layer stack)
    predict(noisy latents, timesteps [B], contexts, sizes [B, 6]) -> the model's ε (or v) prediction;
        sizes holds SDXL's size conditioning per image: original height, width, crop top, left,
        target height, width
    probe: records cross-attention for the attention regulariser (None: no regulariser)"""
    encode_images: Callable
    encode_text: Callable
    predict: Callable
    schedule: NoiseSchedule
    probe: Optional[AttentionProbe] = None


def steps_for_repeats(num_images, repeats, batch_size):
    """The original's count: len(dataset) / batch = N_images · repeats / batch, rounded up."""
    return math.ceil(num_images * repeats / batch_size)


def derived_seed(*parts):
    return random.Random(":".join(str(p) for p in parts)).getrandbits(63)


class EDLoRATraining:
    """Embeddings, LoRA adapters, AdamW (one param group each: embeddings, text LoRA of every
    encoder, UNet LoRA) and the linear schedule.

    text_adapters_2: the second text encoder's adapters (SDXL's clip_g), or None.
    norm_columns: the embedding columns the freeze threshold measures (SDXL: clip_l's 768, where
    the original measures it); None: whole rows."""

    def __init__(self, config, samples, tables, text_adapters, unet_adapters, model, device="cpu",
                 text_adapters_2=None, norm_columns=None):
        self.config, self.samples, self.model = config, samples, model
        self.device = torch.device(device)
        self.norm_columns = norm_columns
        self.embeddings = {w: torch.nn.Parameter(tables[w].detach().float().to(self.device).clone())
                           for w in config.words}
        self.adapters = {"text": text_adapters, "unet": unet_adapters}
        if text_adapters_2 is not None:
            self.adapters["text_2"] = text_adapters_2
        self.optimizer = torch.optim.AdamW(self._param_groups(), betas=(0.9, 0.999),
                                           weight_decay=config.weight_decay)
        total = config.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(0.0, (total - s) / total))
        self.scaler = torch.amp.GradScaler(self.device.type) if config.mixed_precision == "fp16" else None
        self.step, self.frozen, self.losses = 0, False, []
        self._orders = {}

    def _param_groups(self):
        lora = {part: [p for a in adapters.values() for p in (a.down, a.up)] for part, adapters in self.adapters.items()}
        return [{"params": list(self.embeddings.values()), "lr": self.config.lr_embedding},
                {"params": lora["text"] + lora.get("text_2", []), "lr": self.config.lr_text_lora},
                {"params": lora["unet"], "lr": self.config.lr_unet_lora}]

    def _order(self, epoch):
        if epoch not in self._orders:
            order = list(range(len(self.samples)))
            random.Random(derived_seed(self.config.seed, "epoch", epoch)).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def batch_indices(self, step):
        n, size = len(self.samples), self.config.batch_size
        return [self._order(p // n)[p % n] for p in range(step * size, (step + 1) * size)]

    def prompt(self, caption, rng):
        c = self.config
        text = bind_placeholder(caption, c.placeholder, c.words)
        if c.shuffle_caption:
            text = shuffle_caption(text, rng)
        return apply_template(text, c.caption_template, rng)

    def batch(self, step):
        """(images [B, 3, R, R], concept masks [B, 1, r, r] or None, valid masks, prompts,
        size conditioning [B, 6]: original height, width, crop top, left, target height, width)."""
        rng = random.Random(derived_seed(self.config.seed, "step", step))
        resolution = self.config.resolution
        images, concept, valid, prompts, sizes = [], [], [], [], []
        for index in self.batch_indices(step):
            sample = self.samples[index]
            placed = place_on_canvas(sample.image, sample.mask, resolution, rng, self.config.crop_p)
            images.append(image_tensor(placed.canvas))
            concept.append(to_latent_size(placed.concept) if placed.concept is not None else None)
            valid.append(to_latent_size(placed.valid))
            prompts.append(self.prompt(sample.caption, rng))
            sizes.append([*sample.size_before_resize, *placed.crop_top_left, resolution, resolution])
        concept = torch.stack(concept) if all(m is not None for m in concept) else None
        return torch.stack(images), concept, torch.stack(valid), prompts, torch.tensor(sizes, dtype=torch.float32)

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.config.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def loss(self, step):
        """The training loss of step `step` (its batch, noise and timesteps), with gradients."""
        c, model = self.config, self.model
        images, concept, valid, prompts, sizes = self.batch(step)
        generator = torch.Generator().manual_seed(derived_seed(c.seed, "noise", step))
        with torch.no_grad():
            latents = model.encode_images(images.to(self.device)).float()
        noise = sample_noise(latents.shape, c.noise_offset, generator).to(self.device)
        timesteps = torch.randint(0, model.schedule.num_timesteps, (latents.shape[0],), generator=generator)
        timesteps = timesteps.to(self.device)
        probe = model.probe if c.attn_reg_weight > 0 else None
        with self._autocast():
            if probe is not None:
                probe.start()
            contexts, positions = model.encode_text(prompts, self.embeddings)
            prediction = model.predict(model.schedule.add_noise(latents, noise, timesteps), timesteps, contexts, sizes)
        # the segmentation mask when there is one, otherwise the image-valid mask (original train loop)
        mask = (concept if concept is not None else valid).to(self.device)
        loss_mask = mask if c.masked_loss else valid.to(self.device)
        loss = masked_mse(prediction, model.schedule.target(latents, noise, timesteps), loss_mask)
        if probe is not None:
            regulariser = attention_regularisation(probe.token_maps(positions.to(self.device)), mask,
                                                   c.reg_full_identity)
            if not torch.isnan(regulariser):  # a full mask leaves nothing outside it
                loss = loss + c.attn_reg_weight * regulariser
        return loss

    def train_step(self):
        """One optimisation step; returns (loss, mean concept-row norm after the step)."""
        loss = self.loss(self.step)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(loss.item())
        norm = mean_row_norm(self.embeddings, self.norm_columns)
        if not self.frozen and norm >= self.config.emb_norm_threshold:
            self.freeze_embeddings()
        return self.losses[-1], norm

    def freeze_embeddings(self):
        """From now on the concept rows keep their value (the original resets them each step);
        AdamW skips parameters without gradients, weight decay included."""
        self.frozen = True
        for table in self.embeddings.values():
            table.requires_grad_(False)

    def tables(self):
        return {w: t.detach().float().cpu().clone() for w, t in self.embeddings.items()}

    def lora_weights(self, part):
        """{module path: (down, up)} of the text or unet adapters, on the CPU in fp32."""
        return {name: (a.down.detach().float().cpu().clone(), a.up.detach().float().cpu().clone())
                for name, a in self.adapters[part].items()}

    def state(self, dataset_names=()):
        """(tensors, info) that restore() turns back into this exact training state."""
        tensors = {f"embedding.{w}": t for w, t in self.tables().items()}
        for part in self.adapters:
            for name, (down, up) in self.lora_weights(part).items():
                tensors[f"lora.{part}.{name}.down"], tensors[f"lora.{part}.{name}.up"] = down, up
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for key, value in values.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().clone()
        info = {"step": self.step, "frozen": self.frozen, "losses": self.losses,
                "config": self.config.fingerprint(), "dataset": list(dataset_names),
                "param_groups": optimizer["param_groups"], "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": "derived from (seed, step)"}
        return tensors, info

    def restore(self, tensors, info, dataset_names=(), source="training state"):
        _check_compatible(info, self.config.fingerprint(), list(dataset_names), source)
        for word, table in self.embeddings.items():
            saved = tensors[f"embedding.{word}"]
            if saved.shape != table.shape:
                raise TrainingStateError(f"{source}: {word} has {list(saved.shape)} embedding rows, this training "
                                         f"{list(table.shape)}; resume with the model and granularity it was saved with")
        with torch.no_grad():
            for word, table in self.embeddings.items():
                table.copy_(tensors[f"embedding.{word}"])
            for part, adapters in self.adapters.items():
                for name, adapter in adapters.items():
                    adapter.down.copy_(tensors[f"lora.{part}.{name}.down"])
                    adapter.up.copy_(tensors[f"lora.{part}.{name}.up"])
        state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        groups = [{**g, "betas": tuple(g["betas"])} for g in info["param_groups"]]  # JSON made it a list
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict(info["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(info["scaler"])
        self.step, self.losses = info["step"], list(info["losses"])
        if info["frozen"]:
            self.freeze_embeddings()


def _check_compatible(info, fingerprint, dataset_names, source):
    saved = info["config"]
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        raise TrainingStateError(f"{source}: cannot resume with different settings ({details}); "
                                 f"use the settings it was saved with, or start fresh")
    if info.get("dataset", []) != dataset_names:
        raise TrainingStateError(f"{source}: the dataset's images changed since this state was saved; "
                                 f"resume needs the same images")


def run_training(training, on_step=None, should_stop=None):
    """Steps until total_steps; True when finished, False when should_stop() asked to stop
    (the state is then consistent at a step boundary, ready to save and resume)."""
    while training.step < training.config.total_steps:
        if should_stop is not None and should_stop():
            return False
        loss, norm = training.train_step()
        if on_step is not None:
            on_step(training, loss, norm)
    return True
