"""Layer-wise encoding against independent plain-torch references (issue: foundation §6)."""
import nodes as comfy_nodes
import pytest
import torch

from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.mixofshow_core.prompt_binding import MAX_PROMPT_CHUNKS, check_prompt_chunks
from comfyui_mixofshow.nodes import edlora_text_encode
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise
from comfyui_mixofshow.nodes.layerwise import CONTEXT_KEY, UnroutedConditioningError
from comfyui_mixofshow.nodes.model_keys import clip_weight_keys, unet_weight_keys

from . import reference
from .sampling import c_in, denoise_once

UNET_ALPHA, TEXT_ALPHA = 0.7, 0.6
PROMPT = "a photo of <a1> <a2> smiling"
SEGMENTS = ("a photo of", "<a1>", "<a2>", "smiling")


@pytest.fixture
def concept(model, clip):
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    edlora = random_edlora(["<a1>", "<a2>"], unet_shapes, text_shapes, seed=3, embedding_scale=0.5)
    return edlora


@pytest.fixture
def patched(model, clip, concept):
    return apply_edlora(model, clip, concept, UNET_ALPHA, TEXT_ALPHA)


def reference_contexts(clip, edlora, segments=SEGMENTS):
    """[16] list of [1, 77, 768]: the LoRA-merged text encoder on copy l of the prompt."""
    state = reference.merged_state(reference.base_state(clip.cond_stage_model), edlora.text_encoder,
                                   clip_weight_keys(clip), TEXT_ALPHA)
    tokenizer = reference.hf_tokenizer()
    pieces = [edlora.embeddings[s] if s.startswith("<") else s for s in segments]
    return [reference.clip_last_hidden_state(state, reference.input_embeddings(state, tokenizer, pieces, layer))
            for layer in range(16)]


def reference_eps(model, edlora, x, sigma, contexts):
    base = model.model.diffusion_model
    keys = {p: k[len("diffusion_model."):] for p, k in unet_weight_keys(model).items()}
    state = reference.merged_state(reference.base_state(base), edlora.unet, keys, UNET_ALPHA)
    unet = reference.reference_unet(base, state)
    t = model.model.model_sampling.timestep(torch.tensor(sigma)).expand(x.shape[0]).float()
    return reference.forward_with_layer_contexts(unet, x * c_in(sigma), t, contexts)


def test_each_cross_attention_layer_sees_its_own_reference_encoding(model, clip, concept, patched):
    patched_model, patched_clip = patched
    seen = {}
    layers = reference.cross_attention_modules(patched_model.model.diffusion_model)
    handles = [m.to_k.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, args[0].clone()))
               for i, m in enumerate(layers)]
    try:
        cond = encode_layerwise(patched_clip, PROMPT)
        denoise_once(patched_model, cond, cond, 1.0)
    finally:
        for h in handles:
            h.remove()
    expected = reference_contexts(clip, concept)
    assert len(seen) == 16
    for layer in range(16):
        assert torch.allclose(seen[layer], expected[layer], atol=2e-4, rtol=1e-4), layer
    assert not torch.allclose(expected[0], expected[15], atol=1e-2), "layers must differ for this test to mean anything"


@pytest.mark.parametrize("batch", [1, 2])
def test_unet_prediction_matches_reference_with_per_layer_contexts_and_cfg(model, clip, concept, patched, batch):
    patched_model, patched_clip = patched
    positive = encode_layerwise(patched_clip, PROMPT)
    negative = encode_layerwise(patched_clip, "blurry")
    x, denoised, sigma = denoise_once(patched_model, positive, negative, 7.0, batch=batch)
    contexts = [c.expand(batch, -1, -1) for c in reference_contexts(clip, concept)]
    uncond = reference_contexts(clip, concept, ("blurry",))
    eps_c = reference_eps(model, concept, x, sigma, contexts)
    eps_u = reference_eps(model, concept, x, sigma, [u.expand(batch, -1, -1) for u in uncond])
    expected = x - sigma * (eps_u + 7.0 * (eps_c - eps_u))
    assert torch.allclose(denoised, expected, atol=1e-3, rtol=1e-3)


def test_conditioning_combine_averages_two_layerwise_predictions(model, clip, concept, patched):
    patched_model, patched_clip = patched
    first = encode_layerwise(patched_clip, PROMPT)
    second = encode_layerwise(patched_clip, "<a2> <a1> at night")
    combined = comfy_nodes.ConditioningCombine().combine(first, second)[0]
    x, denoised, sigma = denoise_once(patched_model, combined, combined, 1.0)
    eps_1 = reference_eps(model, concept, x, sigma, reference_contexts(clip, concept))
    eps_2 = reference_eps(model, concept, x, sigma, reference_contexts(clip, concept, ("<a2>", "<a1>", "at night")))
    assert torch.allclose(denoised, x - sigma * (eps_1 + eps_2) / 2, atol=1e-3, rtol=1e-3)


def test_prompt_without_concepts_equals_clip_text_encode(patched):
    _, patched_clip = patched
    ours = encode_layerwise(patched_clip, "a red (house:1.3) on a hill")
    stock = comfy_nodes.CLIPTextEncode().encode(patched_clip, "a red (house:1.3) on a hill")[0]
    assert torch.equal(ours[0][0], stock[0][0])
    assert torch.equal(ours[0][1]["pooled_output"], stock[0][1]["pooled_output"])
    stack = ours[0][1]["model_conds"][CONTEXT_KEY].cond
    assert stack.shape == (1, 16, 77, 768) and torch.equal(stack[:, 7], stock[0][0])


def test_plain_clip_gives_exactly_clip_text_encode_output(clip):
    ours = encode_layerwise(clip, "a cat")
    stock = comfy_nodes.CLIPTextEncode().encode(clip, "a cat")[0]
    assert torch.equal(ours[0][0], stock[0][0]) and "model_conds" not in ours[0][1]


def test_plain_negative_prompt_samples_like_clip_text_encode(patched):
    patched_model, patched_clip = patched
    positive = encode_layerwise(patched_clip, "a house")
    ours = denoise_once(patched_model, positive, encode_layerwise(patched_clip, "ugly"), 5.0)[1]
    stock_pos = comfy_nodes.CLIPTextEncode().encode(patched_clip, "a house")[0]
    stock_neg = comfy_nodes.CLIPTextEncode().encode(patched_clip, "ugly")[0]
    stock = denoise_once(patched_model, stock_pos, stock_neg, 5.0)[1]
    assert torch.allclose(ours, stock, atol=1e-5)


def test_long_prompt_keeps_every_chunk_per_layer(patched):
    _, patched_clip = patched
    long_prompt = "<a1> <a2> " + ", ".join(["a very detailed scene"] * 30)
    cond = encode_layerwise(patched_clip, long_prompt)
    stack = cond[0][1]["model_conds"][CONTEXT_KEY].cond
    assert stack.shape[2] == cond[0][0].shape[1] and stack.shape[2] % 77 == 0 and stack.shape[2] > 77


def test_long_prompt_encoded_in_batches_equals_one_batch(patched, monkeypatch):
    _, patched_clip = patched
    prompt = "<a1> <a2> " + ", ".join(["a very detailed scene"] * 25)
    copies = edlora_text_encode.bound_copies(patched_clip, prompt, range(16))[0]
    chunks = [chunk for copy in copies for chunk in copy]
    assert len(chunks) == 32
    one_batch, one_pooled = patched_clip.encode_from_tokens({"l": chunks}, return_pooled=True)

    calls = []
    encode = patched_clip.encode_from_tokens
    monkeypatch.setattr(patched_clip, "encode_from_tokens", lambda tokens, **kw: calls.append(1) or encode(tokens, **kw))
    monkeypatch.setattr(edlora_text_encode, "ENCODE_BATCH", 12)
    cond, options = encode_layerwise(patched_clip, prompt)[0]
    assert len(calls) == 3  # 32 chunks, 12 at a time
    stack = options["model_conds"][CONTEXT_KEY].cond
    assert torch.equal(stack, one_batch.reshape(1, 16, 154, -1))
    assert torch.equal(cond, stack[:, 0]) and torch.equal(options["pooled_output"], one_pooled)


def test_prompts_longer_than_the_chunk_cap_are_refused(patched):
    _, patched_clip = patched
    too_long = " ".join(["castle"] * (75 * MAX_PROMPT_CHUNKS + 1))
    message = f"text: {MAX_PROMPT_CHUNKS + 1} chunks of 75 tokens, more than the {MAX_PROMPT_CHUNKS} a prompt may hold"
    for text in (too_long, "<a1> <a2> " + too_long):
        with pytest.raises(ValueError, match=message):
            encode_layerwise(patched_clip, text)
    check_prompt_chunks([[]] * MAX_PROMPT_CHUNKS)


def test_layerwise_conditioning_on_an_unpatched_model_fails_clearly(model, patched):
    _, patched_clip = patched
    cond = encode_layerwise(patched_clip, PROMPT)
    with pytest.raises(UnroutedConditioningError, match="connect the MODEL output of 'EDLoRA Loader'"):
        denoise_once(model, cond, cond, 1.0)


def test_unknown_concept_word_is_reported(patched):
    _, patched_clip = patched
    with pytest.raises(ValueError, match="unknown concept word <b1>; known words: <a1>, <a2>"):
        encode_layerwise(patched_clip, "<b1> on a beach")


def test_t2i_adapter_applied_with_stock_node_keeps_layerwise_routing(tmp_path, model, clip, concept, patched):
    import comfy.controlnet
    from comfyui_mixofshow.harness.models import write_t2i_adapter
    patched_model, patched_clip = patched
    adapter = comfy.controlnet.load_controlnet(write_t2i_adapter(str(tmp_path / "keypose.safetensors")))
    pose = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    positive = encode_layerwise(patched_clip, PROMPT)
    controlled = comfy_nodes.ControlNetApply().apply_controlnet(positive, adapter, pose, 1.0)[0]
    seen = {}
    layers = reference.cross_attention_modules(patched_model.model.diffusion_model)
    handles = [m.to_k.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, args[0].clone()))
               for i, m in enumerate(layers)]
    try:
        with_control = denoise_once(patched_model, controlled, controlled, 1.0)[1]
    finally:
        for h in handles:
            h.remove()
    without_control = denoise_once(patched_model, positive, positive, 1.0)[1]
    expected = reference_contexts(clip, concept)
    assert all(torch.allclose(seen[i], expected[i], atol=2e-4, rtol=1e-4) for i in range(16))
    assert (with_control - without_control).abs().max() > 1e-3
