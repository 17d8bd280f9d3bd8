"""SDXL ED-LoRAs through EDLoRA Loader and EDLoRA Text Encode against plain-torch references:
merged weights on the UNet and both text encoders, per-layer 2048-wide contexts on all 70
cross-attention layers, pooled output, and the UNet prediction with CFG and batch 2."""
import comfy.model_management
import nodes as comfy_nodes
import pytest
import torch

from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.mixofshow_core.families import SDXL
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise
from comfyui_mixofshow.nodes.layerwise import CONTEXT_KEY
from comfyui_mixofshow.nodes.model_keys import ModelMismatchError, clip_weight_keys, unet_weight_keys

from . import reference, sdxl_reference
from .sampling import c_in, denoise_once
from .sdxl_fixtures import base_sdxl_clip, base_sdxl_model, sdxl_clip, sdxl_edlora, sdxl_model  # noqa: F401

UNET_ALPHA, TEXT_ALPHA = 0.7, 0.6
PROMPT = "a photo of <a1> <a2> smiling"
SEGMENTS = ("a photo of", "<a1>", "<a2>", "smiling")


@pytest.fixture(scope="module", params=["block", "transformer"])
def concept(request, base_sdxl_model, base_sdxl_clip):
    with torch.inference_mode():
        return sdxl_edlora(base_sdxl_model, base_sdxl_clip, ["<a1>", "<a2>"], request.param, embedding_scale=0.5,
                           text_lora_scale=0.3)


@pytest.fixture(scope="module")
def prompt_reference(base_sdxl_clip, concept):
    """Reference (context, pooled) of every layer copy of PROMPT, computed once per concept."""
    with torch.inference_mode():
        return reference_contexts(base_sdxl_clip, concept)


@pytest.fixture
def patched(sdxl_model, sdxl_clip, concept):
    return apply_edlora(sdxl_model, sdxl_clip, concept, UNET_ALPHA, TEXT_ALPHA)


def merged_text_state(clip, edlora):
    state = reference.base_state(clip.cond_stage_model)
    for section, layers in edlora.text_parts().items():
        state = reference.merged_state(state, layers, clip_weight_keys(clip, section), TEXT_ALPHA)
    return state


def layer_tables(edlora):
    """word -> [70, 2048], expanded from the file's rows by hand: row of layer l's spatial
    transformer (transformer granularity) or row l (block granularity)."""
    depths = [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2]
    rows = ([t for t, depth in enumerate(depths) for _ in range(depth)] if edlora.granularity == "transformer"
            else list(range(70)))
    return {w: e[rows] for w, e in edlora.embeddings.items()}


def reference_contexts(clip, edlora, segments=SEGMENTS):
    """[70] list of ([1, 77, 2048] context, [1, 1280] pooled) of copy l with the LoRA-merged encoders
    (a prompt without concept words has one copy for every layer)."""
    state = merged_text_state(clip, edlora)
    tables = layer_tables(edlora)
    pieces = [tables[s] if s.startswith("<") else s for s in segments]
    tokenizer = reference.hf_tokenizer()
    if all(isinstance(p, str) for p in pieces):
        return [sdxl_reference.context_and_pooled(state, tokenizer, pieces, 0)] * 70
    return [sdxl_reference.context_and_pooled(state, tokenizer, pieces, layer) for layer in range(70)]


def reference_eps(model, edlora, x, sigma, contexts, y):
    base = model.model.diffusion_model
    keys = {p: k[len("diffusion_model."):] for p, k in unet_weight_keys(model).items()}
    state = reference.merged_state(reference.base_state(base), edlora.unet, keys, UNET_ALPHA)
    unet = reference.reference_unet(base, state)
    t = model.model.model_sampling.timestep(torch.tensor(sigma)).expand(x.shape[0]).float()
    return sdxl_reference.forward_with_layer_contexts(unet, x * c_in(sigma), t, contexts, y)


def loaded_weights(patcher):
    comfy.model_management.load_models_gpu([patcher])
    return {k: v.clone() for k, v in patcher.model.state_dict().items()}


def test_weights_merge_on_the_unet_and_both_text_encoders(sdxl_model, sdxl_clip, concept):
    unet_base = reference.base_state(sdxl_model.model)
    text_base = reference.base_state(sdxl_clip.cond_stage_model)
    patched_model, patched_clip = apply_edlora(sdxl_model, sdxl_clip, concept, 0.8, 0.3)
    unet = loaded_weights(patched_model)
    path = "mid_block.attentions.0.transformer_blocks.7.attn2.to_k"
    key = "diffusion_model.middle_block.1.transformer_blocks.7.attn2.to_k.weight"
    layer = concept.unet[path]
    assert torch.allclose(unet[key].double(), unet_base[key].double() + 0.8 * layer.up.double() @ layer.down.double(),
                          atol=1e-5)
    assert len(concept.unet) == 70 * 8
    assert sum(not torch.equal(unet_base[k], unet[k]) for k in unet_base) == 70 * 8
    text = loaded_weights(patched_clip.patcher)
    for section, encoder in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        layer = concept.text_parts()[section]["text_model.encoder.layers.2.self_attn.q_proj"]
        key = f"{encoder}.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight"
        expected = text_base[key].double() + 0.3 * layer.up.double() @ layer.down.double()
        assert torch.allclose(text[key].double(), expected, rtol=2 ** -10, atol=1e-6), section
    assert len(concept.text_encoder) == len(concept.text_encoder_2) == 3 * 4


def test_each_of_the_70_layers_sees_its_own_reference_context(concept, patched, prompt_reference):
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
    expected = prompt_reference
    assert len(seen) == 70
    for layer in range(70):
        assert torch.allclose(seen[layer], expected[layer][0], atol=3e-3, rtol=1e-3), layer
    assert torch.allclose(cond[0][1]["pooled_output"].float(), expected[0][1], atol=3e-3, rtol=1e-3)
    assert not torch.allclose(expected[0][0], expected[69][0], atol=1e-2), "layers must differ"
    assert cond[0][1]["model_conds"][CONTEXT_KEY].cond.shape == (1, 70, 77, 2048)


def test_unet_prediction_matches_reference_with_per_layer_contexts_and_cfg_at_batch_2(sdxl_model, sdxl_clip,
                                                                                      concept, patched,
                                                                                      prompt_reference):
    batch = 2
    patched_model, patched_clip = patched
    positive = encode_layerwise(patched_clip, PROMPT)
    negative = encode_layerwise(patched_clip, "blurry")
    x, denoised, sigma = denoise_once(patched_model, positive, negative, 7.0, batch=batch)
    cond = prompt_reference
    uncond = reference_contexts(sdxl_clip, concept, ("blurry",))
    eps_c = reference_eps(sdxl_model, concept, x, sigma, [c.expand(batch, -1, -1) for c, _ in cond],
                          sdxl_reference.adm(cond[0][1].expand(batch, -1)))
    eps_u = reference_eps(sdxl_model, concept, x, sigma, [u.expand(batch, -1, -1) for u, _ in uncond],
                          sdxl_reference.adm(uncond[0][1].expand(batch, -1)))
    expected = x - sigma * (eps_u + 7.0 * (eps_c - eps_u))
    assert torch.allclose(denoised, expected, atol=2e-3, rtol=2e-3)


def test_transformer_granularity_encodes_one_copy_per_spatial_transformer(sdxl_model, sdxl_clip, monkeypatch):
    concept = sdxl_edlora(sdxl_model, sdxl_clip, ["<a1>", "<a2>"], "transformer")
    _, patched_clip = apply_edlora(sdxl_model, sdxl_clip, concept, UNET_ALPHA, TEXT_ALPHA)
    chunks = []
    encode = patched_clip.encode_from_tokens
    monkeypatch.setattr(patched_clip, "encode_from_tokens",
                        lambda tokens, **kw: chunks.append(len(tokens["g"])) or encode(tokens, **kw))
    stack = encode_layerwise(patched_clip, PROMPT)[0][1]["model_conds"][CONTEXT_KEY].cond
    assert sum(chunks) == 11
    assert torch.equal(stack[:, 4], stack[:, 13]) and not torch.equal(stack[:, 13], stack[:, 14])


def test_prompt_without_concepts_equals_the_stock_sdxl_encode(patched):
    _, patched_clip = patched
    ours = encode_layerwise(patched_clip, "a red (house:1.3) on a hill")
    stock = comfy_nodes.CLIPTextEncode().encode(patched_clip, "a red (house:1.3) on a hill")[0]
    assert torch.equal(ours[0][0], stock[0][0])
    assert torch.equal(ours[0][1]["pooled_output"], stock[0][1]["pooled_output"])
    stack = ours[0][1]["model_conds"][CONTEXT_KEY].cond
    assert stack.shape == (1, 70, 77, 2048) and torch.equal(stack[:, 33], stock[0][0])


def test_an_edlora_of_the_other_family_is_refused_naming_the_file(sdxl_model, sdxl_clip, model, clip):
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    sd15_concept = random_edlora(["<s1>"], unet_shapes, text_shapes, name="potter_sd15.safetensors")
    with pytest.raises(ModelMismatchError, match=r"^potter_sd15.safetensors: an ED-LoRA for sd15 models cannot "
                                                 r"be applied to this sdxl model"):
        apply_edlora(sdxl_model, sdxl_clip, sd15_concept, 1.0, 1.0)
    sdxl_concept = sdxl_edlora(sdxl_model, sdxl_clip, ["<x1>"], "transformer", name="hermione_xl.safetensors")
    with pytest.raises(ModelMismatchError, match=r"^hermione_xl.safetensors: an ED-LoRA for sdxl models cannot "
                                                 r"be applied to this sd15 model"):
        apply_edlora(model, clip, sdxl_concept, 1.0, 1.0)
    assert SDXL.num_rows("transformer") == 11
