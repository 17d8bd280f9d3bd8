"""The training loop on a small plain-torch model: learning, the embedding freeze, the
optimiser and schedule, exact resume, regulariser and autocast."""
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_mixofshow.mixofshow_core.training.attention import AttentionProbe
from comfyui_mixofshow.mixofshow_core.training.dataset import TrainingSample
from comfyui_mixofshow.mixofshow_core.training.diffusion import NoiseSchedule
from comfyui_mixofshow.mixofshow_core.training.lora import attached, make_adapters
from comfyui_mixofshow.mixofshow_core.training.loop import (EDLoRATraining, TrainingConfig, TrainingModel,
                                                            run_training)
from comfyui_mixofshow.mixofshow_core.training.state import (TrainingStateError, load_training_state,
                                                             save_training_state)

WORDS = ("<a1>", "<a2>")
LAYERS, DIM, TOKENS, VOCAB = 4, 16, 12, 64


class ToyText(torch.nn.Module):
    """Word lookup + one projection; concept words read their layer row."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(10)
        self.vocabulary = torch.randn(VOCAB, DIM, generator=generator) * 0.3
        self.proj = torch.nn.Linear(DIM, DIM)

    def forward(self, prompts, tables):
        contexts, positions = [], []
        for prompt in prompts:
            words = prompt.replace(",", " ").split()[:TOKENS]
            words += ["<pad>"] * (TOKENS - len(words))
            layers = [torch.stack([tables[w][l] if w in tables else self.vocabulary[zlib.crc32(w.encode()) % VOCAB]
                                   for w in words]) for l in range(LAYERS)]
            contexts.append(self.proj(torch.stack(layers)))
            positions.append([words.index(w) for w in WORDS])
        return torch.stack(contexts), torch.tensor(positions)


class ToyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(4, 8), torch.nn.Linear(DIM, 8),
                                                        torch.nn.Linear(DIM, 8), torch.nn.Linear(8, 4))
        self.heads = 2

    def forward(self, h, context):
        b, n, _ = h.shape
        q = self.to_q(h).reshape(b, n, 2, 4).transpose(1, 2)
        k = self.to_k(context).reshape(b, -1, 2, 4).transpose(1, 2)
        v = self.to_v(context).reshape(b, -1, 2, 4).transpose(1, 2)
        out = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, 8))


class ToyUNet(torch.nn.Module):
    """Layer l cross-attends to contexts[:, l]."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(ToyAttention() for _ in range(LAYERS))
        self.time = torch.nn.Linear(1, 4)

    def forward(self, x, timesteps, contexts, sizes):
        h = x.flatten(2).transpose(1, 2) + self.time(timesteps.float()[:, None, None] / 1000)
        for index, layer in enumerate(self.layers):
            h = h + layer(h, contexts[:, index])
        return h.transpose(1, 2).reshape(x.shape)


def toy_parts(seed=0):
    torch.manual_seed(seed)
    text, unet = ToyText().requires_grad_(False), ToyUNet().requires_grad_(False)
    encoder = torch.nn.Conv2d(3, 4, 1).requires_grad_(False)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    schedule = NoiseSchedule(torch.cumprod(1 - betas, 0))
    text_targets = {"proj": text.proj}
    unet_targets = {f"layers.{i}.{n}": getattr(layer, n) for i, layer in enumerate(unet.layers)
                    for n in ("to_q", "to_k", "to_v", "to_out")}
    probe = AttentionProbe([(layer.to_q, layer.to_k, layer.heads) for layer in unet.layers])
    model = TrainingModel(encode_images=lambda images: encoder(torch.nn.functional.avg_pool2d(images * 2 - 1, 8)),
                          encode_text=text, predict=unet, schedule=schedule, probe=probe)
    return model, text_targets, unet_targets


def toy_samples(count=3, with_masks=False):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (32, 48 if i % 2 else 32, 3), dtype=np.uint8))
        mask = None
        if with_masks:
            pixels = np.zeros((image.size[1], image.size[0]), np.uint8)
            pixels[8:24, 8:24] = 255
            mask = Image.fromarray(pixels, "L")
        samples.append(TrainingSample(f"{i}.png", image, "<TOK>, red shirt, smiling", mask))
    return samples


def initial_tables(scale=0.1):
    generator = torch.Generator().manual_seed(3)
    return {w: (torch.randn(DIM, generator=generator) * scale).expand(LAYERS, DIM).clone() for w in WORDS}


class Toy:
    """A training on the toy model with its adapters attached while in use."""

    def __init__(self, samples=None, **overrides):
        settings = dict(total_steps=8, words=WORDS, batch_size=2, resolution=32, caption_template="human",
                        lr_embedding=1e-2, lr_text_lora=1e-3, lr_unet_lora=1e-2, seed=5)
        settings.update(overrides)
        self.config = TrainingConfig(**settings)
        self.model, self.text_targets, self.unet_targets = toy_parts()
        self.training = EDLoRATraining(self.config, samples or toy_samples(), initial_tables(),
                                       make_adapters(self.text_targets, 2, seed=1),
                                       make_adapters(self.unet_targets, 2, seed=2), self.model)

    def __enter__(self):
        self.contexts = [attached(self.text_targets, self.training.adapters["text"]),
                         attached(self.unet_targets, self.training.adapters["unet"]), self.model.probe.attached()]
        for context in self.contexts:
            context.__enter__()
        return self.training

    def __exit__(self, *exc):
        for context in reversed(self.contexts):
            context.__exit__(*exc)


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys()
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key
    assert a[1] == b[1]


def test_loss_decreases_over_a_few_dozen_steps_on_a_fixed_batch():
    with Toy(total_steps=40, batch_size=2, attn_reg_weight=0.0) as training:
        fixed = training.loss
        training.loss = lambda step: fixed(0)  # the same images, noise and timesteps every step
        with torch.no_grad():
            before = fixed(0).item()
        run_training(training)
        with torch.no_grad():
            after = fixed(0).item()
    assert after < 0.5 * before
    assert training.losses[-1] < training.losses[0]


def test_embeddings_freeze_once_their_mean_norm_reaches_the_threshold():
    start = initial_tables()
    start_norm = torch.cat(list(start.values())).norm(dim=-1).mean().item()
    with Toy(total_steps=30, emb_norm_threshold=start_norm + 0.05, lr_embedding=5e-3) as training:
        norms, frozen_at = [], None
        while training.step < 30:
            _, norm = training.train_step()
            norms.append(norm)
            if training.frozen and frozen_at is None:
                frozen_at, tables, lora = training.step, training.tables(), training.lora_weights("unet")
        assert frozen_at is not None, norms
        assert norms[frozen_at - 1] >= start_norm + 0.05 > max(norms[:frozen_at - 1], default=0.0)
        assert all(torch.equal(tables[w], t) for w, t in training.tables().items())
        assert any(not torch.equal(lora[n][1], up) for n, (_, up) in training.lora_weights("unet").items())


def test_embeddings_keep_training_below_the_threshold():
    with Toy(total_steps=3, emb_norm_threshold=100.0) as training:
        first = training.tables()
        run_training(training)
        assert not training.frozen
        assert all(not torch.equal(first[w], t) for w, t in training.tables().items())


def test_adamw_groups_and_linear_decay_to_zero():
    with Toy(total_steps=4, lr_embedding=1e-3, lr_text_lora=1e-5, lr_unet_lora=1e-4) as training:
        groups = training.optimizer.param_groups
        assert [g["lr"] for g in groups] == [1e-3, 1e-5, 1e-4]
        assert all(g["weight_decay"] == 0.01 and g["betas"] == (0.9, 0.999) for g in groups)
        assert [len(g["params"]) for g in groups] == [2, 2, 2 * 4 * LAYERS]
        for step in range(1, 5):
            training.train_step()
            assert groups[2]["lr"] == pytest.approx(1e-4 * (4 - step) / 4)


def test_each_epoch_visits_every_image_once():
    with Toy(total_steps=6, batch_size=2) as training:
        seen = [i for step in range(6) for i in training.batch_indices(step)]
    for epoch in range(4):
        assert sorted(seen[3 * epoch:3 * epoch + 3]) == [0, 1, 2]
    assert seen[:3] != seen[3:6] or seen[3:6] != seen[6:9]


@pytest.mark.parametrize("precision", ["no", "fp16"])  # fp16 also restores the gradient scaler
def test_resume_from_a_saved_state_equals_an_uninterrupted_run(tmp_path, precision):
    with Toy(total_steps=6, mixed_precision=precision) as straight:
        run_training(straight)
        expected = straight.state()
    path = str(tmp_path / "state.safetensors")
    with Toy(total_steps=6, mixed_precision=precision) as first:
        assert not run_training(first, should_stop=lambda: first.step == 3)
        save_training_state(path, *first.state())
    with Toy(total_steps=6, mixed_precision=precision) as resumed:
        resumed.restore(*load_training_state(path))
        assert resumed.step == 3
        assert run_training(resumed)
        assert_same_state(resumed.state(), expected)


def test_resume_refuses_other_settings_or_images(tmp_path):
    with Toy(total_steps=2) as training:
        training.train_step()
        tensors, info = training.state(["0.png", "1.png", "2.png"])
    with Toy(total_steps=2, lr_unet_lora=5e-4) as other:
        with pytest.raises(TrainingStateError, match=r"lr_unet_lora: 0.01 -> 0.0005"):
            other.restore(tensors, info, ["0.png", "1.png", "2.png"])
    with Toy(total_steps=2) as other:
        with pytest.raises(TrainingStateError, match="images changed"):
            other.restore(tensors, info, ["0.png"])


def test_same_seed_same_training_other_seed_other_training():
    runs = []
    for seed in (5, 5, 6):
        with Toy(total_steps=2, seed=seed) as training:
            run_training(training)
            runs.append(training.tables())
    assert all(torch.equal(runs[0][w], runs[1][w]) for w in WORDS)
    assert not torch.equal(runs[0][WORDS[0]], runs[2][WORDS[0]])


def test_attention_regulariser_adds_to_the_loss_inside_a_mask():
    losses = {}
    for weight in (0.0, 1.0):
        with Toy(total_steps=1, attn_reg_weight=weight, samples=toy_samples(with_masks=True)) as training:
            with torch.no_grad():
                losses[weight] = training.loss(0).item()
    assert np.isfinite(losses[1.0]) and losses[1.0] > losses[0.0]


def test_masked_loss_uses_the_concept_masks():
    losses = {}
    for masked in (False, True):
        with Toy(total_steps=1, masked_loss=masked, attn_reg_weight=0.0,
                 samples=toy_samples(with_masks=True)) as training:
            images, concept, valid, *_ = training.batch(0)
            assert concept is not None and concept.shape == valid.shape == (2, 1, 4, 4)
            with torch.no_grad():
                losses[masked] = training.loss(0).item()
    assert losses[True] != losses[False]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_fp32_parameters(precision):
    with Toy(total_steps=2, mixed_precision=precision) as training:
        run_training(training)
        assert all(np.isfinite(loss) for loss in training.losses)
        assert all(t.dtype == torch.float32 for t in training.embeddings.values())


def test_on_step_sees_every_step_and_should_stop_stops_at_a_boundary():
    seen = []
    with Toy(total_steps=5) as training:
        finished = run_training(training, on_step=lambda t, loss, norm: seen.append((t.step, loss)),
                                should_stop=lambda: len(seen) == 2)
    assert not finished and [s for s, _ in seen] == [1, 2] and training.step == 2
