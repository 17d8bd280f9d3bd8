"""LoRA Concept on the tiny model: every key style's ΔW against plain torch and against the stock
LoraLoader, fusion of ordinary LoRAs (alone and mixed with an ED-LoRA), and the error cases."""
import comfy.lora
import folder_paths
import pytest
import torch
from safetensors.torch import save_file

from comfyui_mixofshow.harness.fusion_checks import (CAPTURE, capture_sample, loaded_weights, relative_error,
                                                      seeded_concepts)
from comfyui_mixofshow.harness.lora_fixtures import STYLES, mixed_identity, random_lora, stock_lora
from comfyui_mixofshow.mixofshow_core.fusion_stats import load_fusion_stats, save_fusion_stats
from comfyui_mixofshow.mixofshow_core.lora_files import LoRAFileError
from comfyui_mixofshow.nodes.concepts import ConceptCollisionError, concepts_of
from comfyui_mixofshow.nodes.gradient_fuse import fuse
from comfyui_mixofshow.nodes.lora_concept import LoRAConcept, LoRAConceptNode
from comfyui_mixofshow.nodes.paths import UnsafePathError


def host_reads(model, clip, state):
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    return bool(comfy.lora.load_lora(state, key_map))


def concept(state, strength_model=1.0, strength_clip=1.0, triggers=("zorbo",), name="lora.safetensors"):
    return LoRAConcept(name, state, tuple(triggers), "", {}, strength_model, strength_clip)


def all_layers(bound):
    layers = {layer.key: layer for part in (bound.edlora.unet, bound.edlora.text_encoder) for layer in part.values()}
    return {**layers, **bound.averaged}


def with_deltas(patcher, layers):
    clone = patcher.clone()
    clone.add_patches({layer.key: ("diff", (layer.delta(),)) for layer in layers}, 1.0)
    return clone


@pytest.mark.parametrize("style", STYLES)
def test_each_layers_delta_is_the_plain_torch_delta_of_the_files_tensors(model, clip, style):
    state, expected = random_lora(model, clip, style, seed=3)
    if not host_reads(model, clip, state):  # PEFT names on the 2024 host: LoraLoader reads nothing either
        with pytest.raises(LoRAFileError, match="lora.safetensors: .* does not read"):
            concept(state).bind(model, clip)
        return
    bound = concept(state).bind(model, clip)
    layers = all_layers(bound)
    assert set(layers) == set(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(layers[key].delta(), delta.float(), rtol=1e-5, atol=1e-8)
    # 3x3 convolutions (LoCon) are averaged, every linear and 1x1 convolution is fused
    convs = {k for k, d in expected.items() if d.dim() == 4 and d.shape[2:] != (1, 1)}
    assert set(bound.averaged) == convs and (style != "locon" or convs)


def assert_within_rounding(actual, expected, plain):
    """Equal up to the two roundings of the weight's dtype the host makes (ΔW, then W0 + ΔW; for LoKr
    the 2024 host rounds ΔW before its final scaling, the diff patch after it)."""
    bound = 2 * torch.finfo(expected.dtype).eps * (plain.abs() + expected.abs()).float()  # ≥ eps·(|W0 + ΔW| + |ΔW|)
    excess = (actual.float() - expected.float()).abs() - bound
    assert float(excess.max()) <= 0.0, float(excess.max())


@pytest.mark.parametrize("style", STYLES)
def test_applied_deltas_give_the_stock_lora_loaders_weights(model, clip, style):
    state, _ = random_lora(model, clip, style, seed=4)
    if not host_reads(model, clip, state):
        pytest.skip("this host's LoraLoader does not read PEFT names")
    stock_model, stock_clip = stock_lora(model, clip, state, 0.8, 0.6)
    bound = concept(state, 0.8, 0.6).bind(model, clip)
    unet = [layer for layer in all_layers(bound).values() if layer.key.startswith("diffusion_model.")]
    text = [layer for layer in all_layers(bound).values() if not layer.key.startswith("diffusion_model.")]
    for base, layers, stock in ((model, unet, stock_model), (clip.patcher, text, stock_clip.patcher)):
        expected, actual, plain = loaded_weights(stock), loaded_weights(with_deltas(base, layers)), loaded_weights(base)
        assert sum(not torch.equal(expected[k], plain[k]) for k in expected) == len(layers)
        for key, weight in expected.items():
            assert_within_rounding(actual[key], weight, plain[key])


def test_fusing_one_ordinary_lora_reproduces_its_own_model(model, clip):
    state, _ = random_lora(model, clip, "kohya", seed=5)
    lora = concept(state, triggers=("zorbo",))
    own = stock_lora(model, clip, state)
    fused_model, fused_clip, stats = fuse(model, clip, [lora], "gradient", tolerance=1e-6, **CAPTURE)
    assert concepts_of(fused_clip).triggers == (("zorbo", "lora.safetensors"),)
    assert stats.concepts[0]["triggers"] == ["zorbo"] and stats.words == []
    plain = capture_sample(model, clip, [])
    expected = capture_sample(*own, ["zorbo"])
    # the sampling run fusion captured, relative to what the LoRA changes
    assert relative_error(capture_sample(fused_model, fused_clip, ["zorbo"]), expected, plain) < 1e-2


def test_adding_an_edlora_to_a_fused_lora_gives_the_from_scratch_kv(tmp_path, model, clip):
    """The fused LoRA's k/v stand-in (saved record + factored k/v ΔW) is recaptured with the new
    fused encoder, so the k/v layers match fusing both from scratch."""
    state, _ = random_lora(model, clip, "kohya", seed=9)
    lora, edlora = concept(state), seeded_concepts(model, clip, 1)[0]
    first_model, first_clip, first_stats = fuse(model, clip, [lora], "gradient", **CAPTURE)
    save_fusion_stats(first_stats, str(tmp_path / "one.fusionstats"))
    reloaded = load_fusion_stats(str(tmp_path / "one.fusionstats"))
    assert reloaded.concepts[0]["triggers"] == ["zorbo"] and set(reloaded.kv_loras[0])
    added_model, added_clip, _ = fuse(first_model, first_clip, [edlora], "gradient", previous=reloaded, **CAPTURE)
    scratch_model, scratch_clip, _ = fuse(model, clip, [lora, edlora], "gradient", **CAPTURE)
    for clip_ in (added_clip, scratch_clip):
        assert concepts_of(clip_).words == ["<a1>", "<a2>"] and concepts_of(clip_).triggers == (("zorbo", "lora.safetensors"),)
    base, added, scratch = loaded_weights(model), loaded_weights(added_model), loaded_weights(scratch_model)
    kv = [k for k in base if ".attn2.to_k" in k or ".attn2.to_v" in k]
    difference = sum(float((added[k].double() - scratch[k].double()).square().sum()) for k in kv)
    change = sum(float((scratch[k].double() - base[k].double()).square().sum()) for k in kv)
    assert change > 0 and (difference / change) ** 0.5 < 1e-3


def test_mixed_fusion_keeps_identities_better_than_averaging_and_stacking(model, clip):
    """The identity measure of benchmarks/bench_lora_fusion.py on its seeded case: only the ordering
    (cond + uncond error per concept) is asserted."""
    table = mixed_identity(model, clip, CAPTURE)
    assert set(table["gradient"]) == {"concept0.safetensors", "zorbo.safetensors"}
    for name, errors in table["gradient"].items():
        gradient = errors["cond"] + errors["uncond"]
        for baseline in ("weight_average", "stacking"):
            assert gradient < table[baseline][name]["cond"] + table[baseline][name]["uncond"], (name, table)


@pytest.fixture
def lora_folder(tmp_path, monkeypatch):
    for name in ("loras", "embeddings"):
        (tmp_path / name).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(tmp_path / name)], {".safetensors", ".pt", ".bin"}))
    return tmp_path


def add(lora_name, triggers="zorbo", embedding="none", concepts=None):
    return LoRAConceptNode().add(lora_name, 1.0, 1.0, triggers, "", embedding, concepts)[0]


def test_the_node_reads_kohya_tags_and_a_textual_inversion_embedding(lora_folder, model, clip):
    state, _ = random_lora(model, clip, "kohya", seed=6)
    tags = '{"10_zorbo": {"zorbo": 12, "1girl": 12, "smile": 3}}'
    save_file(state, str(lora_folder / "loras" / "zorbo.safetensors"), metadata={"ss_tag_frequency": tags})
    vectors = torch.randn(2, 768)
    torch.save({"string_to_param": {"*": vectors}, "name": "zemb"}, str(lora_folder / "embeddings" / "zemb.pt"))
    concepts = add("zorbo.safetensors", triggers="", embedding="zemb.pt")
    assert concepts[0].triggers == ("zorbo", "1girl")
    assert concepts[0].words == ["<zemb.1>", "<zemb.2>"]
    for row, word in zip(vectors, concepts[0].words):
        assert torch.equal(concepts[0].embeddings[word], row.expand(16, -1))
    _, fused_clip, _ = fuse(model, clip, concepts, "weight_average", **CAPTURE)
    assert concepts_of(fused_clip).words == ["<zemb.1>", "<zemb.2>"]


def write_lora(folder, name, state):
    save_file(state, str(folder / "loras" / name))
    return name


def test_bad_files_give_one_error_naming_the_file_and_the_layer_kind(lora_folder, model, clip):
    state, _ = random_lora(model, clip, "kohya", seed=7)
    key = next(k for k in state if k.endswith(".lora_down.weight"))
    dora = dict(state, **{key.replace(".lora_down.weight", ".dora_scale"): torch.ones(1, 4)})
    with pytest.raises(LoRAFileError, match=r"dora\.safetensors: DoRA layer lora_unet_\w+"):
        add(write_lora(lora_folder, "dora.safetensors", dora))
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(LoRAFileError, match="broken.safetensors: malformed LoRA"):
        fuse(model, clip, add(write_lora(lora_folder, "broken.safetensors", broken)), "weight_average", **CAPTURE)
    unknown = dict(state, **{"lora_unet_nowhere_layer.lora_up.weight": torch.zeros(4, 4)})
    with pytest.raises(LoRAFileError, match="unknown.safetensors: 1 key.*lora_unet_nowhere_layer.*unknown layer kind"):
        fuse(model, clip, add(write_lora(lora_folder, "unknown.safetensors", unknown)), "weight_average", **CAPTURE)
    wrong = dict(state, **{key: torch.randn(4, 7)})  # a LoRA made for another base model
    with pytest.raises(LoRAFileError, match=r"wrong.safetensors: lora layer diffusion_model\.\S+ cannot be applied"):
        fuse(model, clip, add(write_lora(lora_folder, "wrong.safetensors", wrong)), "weight_average", **CAPTURE)
    (lora_folder / "loras" / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAFileError, match="garbage.safetensors: not a readable"):
        add("garbage.safetensors")
    with pytest.raises(FileNotFoundError, match="lora_name: 'missing.safetensors' is not in models/loras"):
        add("missing.safetensors")
    (lora_folder / "escape.safetensors").write_bytes((lora_folder / "loras" / "wrong.safetensors").read_bytes())
    for outside in ("../escape.safetensors", str(lora_folder / "escape.safetensors")):
        with pytest.raises(UnsafePathError, match=r"lora_name '.*: must be a path inside models/loras"):
            add(outside)


def test_colliding_trigger_words_are_refused(lora_folder, model, clip):
    state, _ = random_lora(model, clip, "kohya", seed=8)
    write_lora(lora_folder, "a.safetensors", state)
    write_lora(lora_folder, "b.safetensors", state)
    first = add("a.safetensors", triggers="zorbo, red hat")
    with pytest.raises(ConceptCollisionError, match="b.safetensors: word zorbo is already used by a.safetensors"):
        add("b.safetensors", triggers="Zorbo", concepts=first)
    # a fused CLIP remembers its trigger words: adding a concept with one of them is refused
    _, fused_clip, _ = fuse(model, clip, first, "weight_average", **CAPTURE)
    with pytest.raises(ConceptCollisionError, match="trigger word 'red hat' is already used by a.safetensors"):
        fuse(model, fused_clip, add("b.safetensors", triggers="red hat"), "weight_average", **CAPTURE)
