"""Training parts against plain-torch references: LoRA injection, autograd hooks, attention
maps and regulariser, diffusion objective, embeddings, state files."""
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_mixofshow.mixofshow_core.training.attention import (AttentionProbe, attention_probabilities,
                                                                 attention_regularisation)
from comfyui_mixofshow.mixofshow_core.training.diffusion import NoiseSchedule, masked_mse, sample_noise
from comfyui_mixofshow.mixofshow_core.training.embeddings import initial_table, mean_row_norm, parse_initializer
from comfyui_mixofshow.mixofshow_core.training.hooks import checkpointed, cloned_inputs
from comfyui_mixofshow.mixofshow_core.training.lora import attached, make_adapters
from comfyui_mixofshow.mixofshow_core.training.state import (TrainingStateError, load_training_state,
                                                             save_training_state)


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_lora_adds_alpha_up_down_with_no_rank_division():
    linear = torch.nn.Linear(6, 5)
    adapters = make_adapters({"l": linear}, rank=3, alpha=0.7)
    adapter = adapters["l"]
    with torch.no_grad():
        adapter.up.copy_(randn(5, 3, seed=1))
    x = randn(2, 6, seed=2)
    with attached({"l": linear}, adapters):
        y = linear(x)
    expected = x @ linear.weight.T + linear.bias + 0.7 * (x @ adapter.down.T) @ adapter.up.T
    assert torch.allclose(y, expected, atol=1e-6)


def test_lora_starts_at_zero_with_kaiming_uniform_down():
    linear = torch.nn.Linear(400, 8)
    adapter = make_adapters({"l": linear}, rank=4)["l"]
    bound = 1 / math.sqrt(400)  # Kaiming uniform with a = √5: √(6 / ((1 + 5) · fan_in))
    assert adapter.down.abs().max() <= bound and adapter.down.abs().max() > 0.95 * bound
    assert not adapter.up.any()
    x = randn(3, 400)
    with attached({"l": linear}, {"l": adapter}):
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


def test_lora_on_a_1x1_conv_equals_the_linear_formula():
    conv = torch.nn.Conv2d(6, 5, 1)
    adapter = make_adapters({"c": conv}, rank=2)["c"]
    with torch.no_grad():
        adapter.up.copy_(randn(5, 2, 1, 1, seed=3))
    x = randn(2, 6, 3, 4, seed=4)
    with attached({"c": conv}, {"c": adapter}):
        y = conv(x)
    delta = adapter.up[:, :, 0, 0] @ adapter.down[:, :, 0, 0]
    expected = torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0] + delta, x) + conv.bias[:, None, None]
    assert adapter.down.shape == (2, 6, 1, 1) and torch.allclose(y, expected, atol=1e-5)


def test_lora_leaves_the_module_untouched_once_detached():
    linear = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    adapters = make_adapters({"l": linear}, rank=2)
    with torch.no_grad():
        adapters["l"].up.fill_(1.0)
    x = randn(2, 4)
    reference = linear(x)
    with attached({"l": linear}, adapters):
        assert not torch.equal(linear(x), reference)
    assert torch.equal(linear(x), reference) and not linear._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())


def test_lora_needs_a_linear_or_1x1_conv():
    with pytest.raises(TypeError, match="got Conv2d"):
        make_adapters({"c": torch.nn.Conv2d(3, 3, 3)}, rank=2)


def test_lora_initialisation_is_seeded():
    targets = {"a": torch.nn.Linear(5, 5), "b": torch.nn.Linear(5, 5)}
    first, second = make_adapters(targets, 2, seed=7), make_adapters(targets, 2, seed=7)
    assert all(torch.equal(first[n].down, second[n].down) for n in targets)
    assert not torch.equal(first["a"].down, make_adapters(targets, 2, seed=8)["a"].down)


class AddAfterNorm(torch.nn.Module):
    """The host's pattern: x += f(norm(x)), with norm keeping x for its backward."""

    def __init__(self):
        super().__init__()
        self.norm, self.linear = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, x, options=None):
        if options is not None:
            options["seen"] = options["index"]
            x = x * (options["index"] + 1)
        x += self.linear(self.norm(x))
        return x


def reference_output(block, x, index=None):
    y = x * (index + 1) if index is not None else x
    return y + block.linear(block.norm(y))


def test_norms_get_input_copies_so_in_place_adds_can_train():
    block = AddAfterNorm()
    x = randn(2, 8).requires_grad_()
    with pytest.raises(RuntimeError, match="inplace"):
        block(x * 1).sum().backward()
    block.zero_grad()
    with cloned_inputs([block.norm]):
        block(x * 1).square().sum().backward()
    ours = block.linear.weight.grad.clone()
    block.zero_grad()
    reference_output(block, x).square().sum().backward()
    assert torch.allclose(ours, block.linear.weight.grad) and not block.norm._forward_pre_hooks


def test_checkpointing_recomputes_with_the_arguments_of_the_forward_call():
    blocks = [AddAfterNorm(), AddAfterNorm()]
    x = randn(3, 8, seed=5)

    def run(use_checkpointing):
        options = {"index": 0}
        with cloned_inputs([b.norm for b in blocks]), checkpointed(blocks if use_checkpointing else []):
            h = x * 1
            for block in blocks:
                h = block(h, options)
                options["index"] += 1  # the caller mutates the shared dict after each block, as the host does
        h.square().sum().backward()
        grads = [b.linear.weight.grad.clone() for b in blocks]
        for b in blocks:
            b.zero_grad()
        return grads, options

    plain, plain_options = run(False)
    ours, ours_options = run(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ours))
    assert ours_options == plain_options == {"index": 2, "seen": 1}
    assert all("forward" not in b.__dict__ for b in blocks)


def test_attention_probabilities_are_softmax_of_scaled_scores_per_head():
    q, k = randn(2, 6, 8, seed=1), randn(2, 5, 8, seed=2)
    probs = attention_probabilities(q, k, heads=2)
    qh, kh = q.reshape(2, 6, 2, 4)[:, :, 1], k.reshape(2, 5, 2, 4)[:, :, 1]
    assert torch.allclose(probs[:, 1], torch.softmax(qh @ kh.transpose(1, 2) / 2.0, -1), atol=1e-6)


def test_token_maps_average_every_head_of_the_layers_at_one_resolution():
    layers = [(torch.nn.Linear(4, 8), torch.nn.Linear(3, 8), 2) for _ in range(3)]
    probe = AttentionProbe(layers)
    inputs = [randn(1, 16, 4, seed=1), randn(1, 4, 4, seed=2), randn(1, 16, 4, seed=3)]
    context = randn(1, 5, 3, seed=4)
    positions = torch.tensor([[3, 1]])
    with probe.attached():
        probe.start()
        for (to_q, to_k, _), x in zip(layers, inputs):
            to_q(x), to_k(context)
        maps = probe.token_maps(positions)
    expected = {}
    for (to_q, to_k, heads), x in zip(layers, inputs):
        probs = attention_probabilities(to_q(x), to_k(context), heads)[..., [3, 1]]
        expected.setdefault(int(math.isqrt(x.shape[1])), []).append(probs)
    assert set(maps) == {4, 2}
    for side, group in expected.items():
        mean = torch.cat(group, dim=1).mean(dim=1).reshape(1, side, side, 2)
        assert torch.allclose(maps[side], mean, atol=1e-6)
    assert not probe.recording and not probe.queries


def test_attention_regulariser_penalises_attention_outside_the_mask():
    maps = {2: torch.tensor([[[[1.0, 2.0], [2.0, 0.0]], [[4.0, 1.0], [0.0, 4.0]]]])}  # [1, 2, 2, 2]
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # word 1 normalised by its max 4: outside cells (0,1),(1,0),(1,1) -> 2/4, 4/4, 0 ; mean 0.5
    # word 2 normalised by its max 4: outside -> 0, 1/4, 1 ; mean 5/12
    assert torch.isclose(attention_regularisation(maps, mask), torch.tensor(0.5 + 5 / 12))
    full_identity = F.mse_loss(torch.tensor([[2.0, 0.0], [1.0, 4.0]]) / 4, mask[0, 0]) + 0.5
    assert torch.isclose(attention_regularisation(maps, mask, full_identity=True), full_identity)
    assert torch.isnan(attention_regularisation(maps, torch.ones(1, 1, 2, 2)))


def test_attention_regulariser_resizes_the_mask_with_nearest():
    maps = {2: torch.rand(1, 2, 2, 2, generator=torch.Generator().manual_seed(0)) + 0.1}
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1.0
    small = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert torch.isclose(attention_regularisation(maps, mask), attention_regularisation(maps, small))


def test_masked_mse_keeps_the_original_factor_of_four():
    prediction, target = randn(2, 4, 3, 3, seed=1), randn(2, 4, 3, 3, seed=2)
    assert torch.isclose(masked_mse(prediction, target, torch.ones(2, 1, 3, 3)), 4 * F.mse_loss(prediction, target))


def test_masked_mse_is_a_per_image_weighted_mean():
    prediction, target = randn(2, 4, 3, 3, seed=1), randn(2, 4, 3, 3, seed=2)
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, 0, 0, 0], mask[1, 0, 1:, 1:] = 1.0, 0.5
    error = (prediction - target) ** 2
    first = error[0, :, 0, 0].sum()
    second = (error[1, :, 1:, 1:] * 0.5).sum() / (0.5 * 4)
    assert torch.isclose(masked_mse(prediction, target, mask), (first + second) / 2)


def test_noising_matches_the_k_diffusion_input_scaling():
    sigmas = torch.linspace(0.03, 14.6, 1000)
    schedule = NoiseSchedule.from_sigmas(sigmas)
    latents, noise, t = randn(2, 4, 3, 3, seed=1), randn(2, 4, 3, 3, seed=2), torch.tensor([10, 900])
    expected = (latents + sigmas[t].view(-1, 1, 1, 1) * noise) / (sigmas[t].view(-1, 1, 1, 1) ** 2 + 1).sqrt()
    assert torch.allclose(schedule.add_noise(latents, noise, t), expected, atol=1e-5)
    assert torch.equal(schedule.target(latents, noise, t), noise)


def test_v_prediction_target():
    schedule = NoiseSchedule(torch.tensor([0.64, 0.36]), "v")
    latents, noise = randn(1, 4, 2, 2, seed=1), randn(1, 4, 2, 2, seed=2)
    assert torch.allclose(schedule.target(latents, noise, torch.tensor([1])), 0.6 * noise - 0.8 * latents)


def test_noise_offset_adds_one_constant_per_image_and_channel():
    plain = sample_noise((2, 4, 5, 5), 0.0, torch.Generator().manual_seed(3))
    offset = sample_noise((2, 4, 5, 5), 0.1, torch.Generator().manual_seed(3))
    difference = offset - plain
    assert torch.allclose(difference, difference[..., :1, :1].expand_as(difference))
    assert difference.abs().max() > 0


def test_initializers():
    assert parse_initializer("<rand-0.013>") == ("random", 0.013)
    assert parse_initializer(" man ") == ("word", "man")
    with pytest.raises(ValueError, match="<rand-0.013>"):
        parse_initializer("two words")
    table = initial_table("<rand-0.5>", 16, 768, None, seed=0, concept_word="<a1>")
    assert table.shape == (16, 768) and torch.equal(table, table[:1].expand(16, -1))
    assert abs(table[0].norm().item() - 0.5 * math.sqrt(768)) < 2.0
    assert not torch.equal(table, initial_table("<rand-0.5>", 16, 768, None, seed=0, concept_word="<b1>"))
    row = randn(768)
    assert torch.equal(initial_table("man", 16, 768, lambda word: row, 0, "<a2>"), row.expand(16, -1))


def test_mean_row_norm_averages_over_all_rows_of_all_words():
    tables = {"<a>": torch.tensor([[3.0, 4.0]]), "<b>": torch.tensor([[0.0, 1.0], [0.0, 2.0]])}
    assert mean_row_norm(tables) == pytest.approx((5 + 1 + 2) / 3)


def test_training_state_round_trips_tensors_and_json(tmp_path):
    path = str(tmp_path / "state.safetensors")
    tensors = {"embedding.<a1>": randn(16, 4), "optimizer.0.step": torch.tensor(3.0)}
    save_training_state(path, tensors, {"step": 3, "losses": [0.5, 0.25]})
    loaded, info = load_training_state(path)
    assert info == {"format": 1, "step": 3, "losses": [0.5, 0.25]}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_wrong_state_files_are_refused(tmp_path):
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(TrainingStateError, match="other.safetensors: not an EDLoRA training state"):
        load_training_state(str(other))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    with pytest.raises(TrainingStateError, match="broken.safetensors"):
        load_training_state(str(broken))
