"""Kohya key names and tensors of an exported ED-LoRA, and the single-vector (textual-inversion) fit."""
import json

import pytest
import torch

from comfyui_mixofshow.mixofshow_core import sd15
from comfyui_mixofshow.mixofshow_core.edlora_format import EDLoRA, LoRALayer, save_edlora
from comfyui_mixofshow.mixofshow_core.kohya_export import (EMBEDDING_KEY, KohyaExportError, embedding_state,
                                                           fit_single_vectors, kohya_lora_state, kohya_metadata,
                                                           kohya_names, layer_objective, mean_rows, objective_floor)
from comfyui_mixofshow.mixofshow_core.safe_io import read_safetensors

# kohya names as kohya's own trainer and A1111 write them, typed out by hand
HAND_WRITTEN = {
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"):
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"):
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
    ("unet", "up_blocks.3.attentions.2.proj_in"): "lora_unet_up_blocks_3_attentions_2_proj_in",
    ("unet", "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"):
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
    ("text_encoder", "text_model.encoder.layers.11.self_attn.out_proj"):
        "lora_te_text_model_encoder_layers_11_self_attn_out_proj",
    ("text_encoder", "text_model.encoder.layers.0.mlp.fc1"): "lora_te_text_model_encoder_layers_0_mlp_fc1",
}


def edlora(rank=4, scale=1.0, seed=0, extra_rank=None):
    g = torch.Generator().manual_seed(seed)

    def layer(out_dim, in_dim, r=rank, conv=False):
        down, up = torch.randn(r, in_dim, generator=g), torch.randn(out_dim, r, generator=g)
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        return LoRALayer(down, up, scale)

    block = sd15.CROSS_ATTN_BLOCKS[2]
    unet = {f"{block}.transformer_blocks.0.attn2.to_k": layer(640, 768),
            f"{block}.transformer_blocks.0.attn1.to_out.0": layer(640, 640),
            f"{block}.proj_in": layer(640, 640, conv=True)}
    text = {"text_model.encoder.layers.3.self_attn.v_proj": layer(768, 768, r=extra_rank or rank)}
    words = {"<p1>": torch.randn(16, 768, generator=g), "<p2>": torch.randn(16, 768, generator=g)}
    return EDLoRA(words, unet, text, "p.safetensors")


def test_kohya_names_match_hand_written_names_and_are_distinct():
    names = kohya_names("sd15")
    for key, expected in HAND_WRITTEN.items():
        assert names[key] == expected
    assert len(names) == len(sd15.unet_lora_layers()) + len(sd15.text_lora_layers())
    assert len(set(names.values())) == len(names)


def test_lora_state_gives_alpha_over_rank_times_up_down_equal_to_edlora_delta():
    concept = edlora(rank=4, scale=0.75)
    state = kohya_lora_state(concept)
    assert len(state) == 3 * 4
    for path, layer in concept.unet.items():
        key = "lora_unet_" + path.replace(".", "_")
        down, up, alpha = (state[key + s] for s in (".lora_down.weight", ".lora_up.weight", ".alpha"))
        assert alpha.dtype == torch.float32 and alpha.dim() == 0
        assert torch.equal(down, layer.down) and torch.equal(up, layer.up)
        kohya_delta = float(alpha) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        assert torch.allclose(kohya_delta, 0.75 * (layer.up.flatten(1) @ layer.down.flatten(1)), rtol=1e-6)


def test_lora_state_dtype_and_the_file_our_edlora_format_writes(tmp_path):
    concept = edlora()
    half = kohya_lora_state(concept, torch.float16)
    assert {v.dtype for k, v in half.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {v.dtype for k, v in half.items() if k.endswith(".alpha")} == {torch.float32}
    save_edlora(concept, str(tmp_path / "c.safetensors"))  # our ED-LoRA files carry kohya LoRA keys too
    written, _ = read_safetensors(str(tmp_path / "c.safetensors"))
    lora_part = {k: v for k, v in written.items() if not k.startswith("edlora_embedding.")}
    exported = kohya_lora_state(concept)
    assert set(lora_part) == set(exported)
    assert all(torch.equal(lora_part[k], exported[k]) for k in exported)


def test_layer_without_a_kohya_name_is_refused():
    concept = edlora()
    odd = EDLoRA(concept.embeddings, {"down_blocks.9.attentions.0.foo": LoRALayer(torch.ones(1, 2), torch.ones(2, 1))},
                 {}, "odd.pth")
    with pytest.raises(KohyaExportError, match="odd.pth: unet layer down_blocks.9.attentions.0.foo has no sd15"):
        kohya_lora_state(odd)


def test_metadata_uses_kohya_conventions_and_records_the_source():
    meta = kohya_metadata(edlora(rank=4, scale=1.0), "potter", "ab" * 32, {"<p1>": "potter_p1"})
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.lora"
    assert meta["mixofshow.exported_from"] == "p.safetensors" and meta["mixofshow.exported_from_sha256"] == "ab" * 32
    assert json.loads(meta["mixofshow.concept_words"]) == ["<p1>", "<p2>"]
    assert all(isinstance(v, str) for v in meta.values())
    mixed = kohya_metadata(edlora(rank=4, extra_rank=8), "x", "0", {})
    assert mixed["ss_network_dim"] == "Dynamic" and mixed["ss_network_alpha"] == "Dynamic"


def test_embedding_state_is_one_float32_row():
    vector = torch.arange(768, dtype=torch.float64)
    state = embedding_state(vector)
    assert list(state) == [EMBEDDING_KEY] and state[EMBEDDING_KEY].shape == (1, 768)
    assert state[EMBEDDING_KEY].dtype == torch.float32 and torch.equal(state[EMBEDDING_KEY][0].double(), vector)


# ---- the single-vector fit ------------------------------------------------------------------

WORDS, DIM, PROMPTS, TOKENS, OUT, LAYERS = 2, 6, 3, 5, 4, 16


def toy_encoder(nonlinear, seed=1):
    """encode(vectors [W, D]) -> [P, T, OUT]: an affine map of the stacked vectors, optionally tanh'd."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(PROMPTS * TOKENS * OUT, WORDS * DIM, generator=g, dtype=torch.float64)
    b = torch.randn(PROMPTS * TOKENS * OUT, generator=g, dtype=torch.float64)

    def encode(vectors):
        y = (a.to(vectors.dtype) @ vectors.reshape(-1) + b.to(vectors.dtype)).reshape(PROMPTS, TOKENS, OUT)
        return torch.tanh(2 * y) if nonlinear else y
    return encode


def layer_rows(seed=2, spread=0.8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(WORDS, 1, DIM, generator=g) * 0.3 + torch.randn(WORDS, LAYERS, DIM, generator=g) * spread


def layer_encodings(encode, rows):
    return torch.stack([encode(rows[:, l].float()) for l in range(LAYERS)], dim=1)


def direct_objective(encode, vectors, rows):
    """J written out: the mean over layers of the mean squared difference to that layer's encoding."""
    total = 0.0
    for l in range(LAYERS):
        total += float((encode(vectors.float()).double() - encode(rows[:, l].float()).double()).square().mean())
    return total / LAYERS


def test_floor_and_objective_are_the_written_out_means():
    encode, rows = toy_encoder(nonlinear=True), layer_rows()
    encodings = layer_encodings(encode, rows)
    vectors = torch.randn(WORDS, DIM)
    assert layer_objective(encode(vectors), encodings) == pytest.approx(direct_objective(encode, vectors, rows), rel=1e-6)
    mean_encoding = encodings.mean(dim=1)
    floor = sum(float((encodings[:, l] - mean_encoding).double().square().mean()) for l in range(LAYERS)) / LAYERS
    assert objective_floor(encodings) == pytest.approx(floor, rel=1e-6)


def test_affine_encoder_keeps_the_mean_of_rows_which_is_optimal():
    """E(mean rows) = mean_l E_l for an affine E, so nothing beats the mean (least squares agrees)."""
    encode, rows = toy_encoder(nonlinear=False), layer_rows()
    encodings = layer_encodings(encode, rows)
    mean = torch.stack([mean_rows(rows[w]) for w in range(WORDS)])
    fit = fit_single_vectors(encode, encodings, mean, steps=20)
    assert fit.initial_objective == pytest.approx(direct_objective(encode, mean, rows), rel=1e-5)
    assert fit.objective <= fit.initial_objective
    assert fit.initial_objective == pytest.approx(fit.floor, rel=1e-5)


def test_nonlinear_encoder_fit_beats_the_mean_and_reaches_an_independent_optimum():
    encode, rows = toy_encoder(nonlinear=True), layer_rows()
    encodings = layer_encodings(encode, rows)
    mean = torch.stack([mean_rows(rows[w]) for w in range(WORDS)])
    calls = []
    fit = fit_single_vectors(encode, encodings, mean, steps=60, on_evaluation=calls.append)
    assert calls == list(range(1, fit.evaluations + 1))
    assert fit.fitted
    assert fit.objective == pytest.approx(direct_objective(encode, fit.vectors, rows), rel=1e-4)
    assert fit.initial_objective == pytest.approx(direct_objective(encode, mean, rows), rel=1e-4)
    assert fit.floor < fit.objective < fit.initial_objective
    # reference: many small plain gradient steps on J written out, in float64, from the mean
    v = mean.double().clone().requires_grad_(True)
    target = encodings.double().mean(dim=1)
    for _ in range(2000):
        loss = (encode(v) - target).square().mean()
        (grad,) = torch.autograd.grad(loss, v)
        with torch.no_grad():
            v -= 0.2 * grad
    reference = direct_objective(encode, v.detach(), rows)
    assert reference < fit.initial_objective
    assert fit.objective <= reference + 1e-4 * (fit.initial_objective - fit.floor)
