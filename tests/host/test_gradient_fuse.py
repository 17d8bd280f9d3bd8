"""Gradient Fuse on the tiny 16-layer model: identity, baselines, incremental fusion, errors."""
import pytest
import torch

from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.harness.fusion_checks import (CAPTURE, capture_sample, concept_words, loaded_weights,
                                                      relative_error, seeded_concepts)
from comfyui_mixofshow.mixofshow_core.fusion_stats import FusionStatsError, load_fusion_stats, save_fusion_stats
from comfyui_mixofshow.nodes.concepts import ConceptCollisionError, concepts_of
from comfyui_mixofshow.nodes.edlora_concept import Concept, EDLoRAConcept, add_concept, parse_rename
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora
from comfyui_mixofshow.nodes.fusion_capture import kv_inputs
from comfyui_mixofshow.mixofshow_core.fusion_solver import solve, solve_like_lbfgs
from comfyui_mixofshow.nodes.gradient_fuse import GradientFuse, fuse
from comfyui_mixofshow.nodes.model_keys import ModelMismatchError
from comfyui_mixofshow.nodes import progress as progress_module

from . import reference

WORDS = tuple(concept_words(i) for i in range(3))


@pytest.fixture
def concepts(model, clip):
    return seeded_concepts(model, clip, len(WORDS))


def test_single_concept_fusion_reproduces_that_concepts_outputs(model, clip, concepts):
    single_model, single_clip = apply_edlora(model, clip, concepts[0].edlora, 1.0, 1.0)
    fused_model, fused_clip, stats = fuse(model, clip, concepts[:1], "gradient", tolerance=1e-6, **CAPTURE)
    assert concepts_of(fused_clip).words == WORDS[0]
    # k/v: the fused layers map the concept's own token features like W0 + ΔW (plain torch reference)
    base, fused = reference.base_state(model.model), loaded_weights(fused_model)
    rows = kv_inputs(fused_clip, WORDS[0])  # the token features the fused k/v layers see
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    delta = concepts[0].edlora.unet["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].delta(1.0)
    target = rows[6] @ (base[key] + delta).T
    # tolerance τ bounds the squared objective, so the relative output error is about √τ = 1e-3
    assert relative_error(rows[6] @ fused[key].T, target, rows[6] @ base[key].T) < 2e-3
    # the whole sampling run on the concept's own prompt, relative to what the concept changes
    plain = capture_sample(model, clip, [])
    expected = capture_sample(single_model, single_clip, WORDS[0])
    assert relative_error(capture_sample(fused_model, fused_clip, WORDS[0]), expected, plain) < 1e-2
    assert len(stats.layers) == 8 + 32 + 96 and stats.words == WORDS[0]


def test_gradient_fusion_keeps_identities_better_than_weight_average(model, clip, concepts):
    gradient = fuse(model, clip, concepts[:2], "gradient", **CAPTURE)
    average = fuse(model, clip, concepts[:2], "weight_average", **CAPTURE)
    for index, concept in enumerate(concepts[:2]):
        single_model, single_clip = apply_edlora(model, clip, concept.edlora, 1.0, 1.0)
        expected = capture_sample(single_model, single_clip, concept.words, index)
        plain = capture_sample(model, clip, [], index)
        error_gradient = relative_error(capture_sample(*gradient[:2], concept.words, index), expected, plain)
        error_average = relative_error(capture_sample(*average[:2], concept.words, index), expected, plain)
        assert error_gradient < 0.75 * error_average, (error_gradient, error_average)


def test_adding_a_concept_to_saved_statistics_matches_fusing_all_from_scratch(tmp_path, model, clip, concepts):
    first_model, first_clip, first_stats = fuse(model, clip, concepts[:2], "gradient", **CAPTURE)
    save_fusion_stats(first_stats, str(tmp_path / "two.fusionstats"))
    reloaded = load_fusion_stats(str(tmp_path / "two.fusionstats"))
    added_model, added_clip, added_stats = fuse(first_model, first_clip, concepts[2:], "gradient",
                                                previous=reloaded, **CAPTURE)
    scratch_model, scratch_clip, _ = fuse(model, clip, concepts, "gradient", **CAPTURE)
    assert concepts_of(added_clip).words == concepts_of(scratch_clip).words == sum(WORDS, [])
    assert added_stats.words == sum(WORDS, [])
    base = reference.base_state(model.model)
    added, scratch = loaded_weights(added_model), loaded_weights(scratch_model)
    changed = [k for k in base if not torch.equal(base[k], scratch[k])]
    assert len(changed) == 32 + 96
    kv_keys = [k for k in changed if ".attn2.to_k" in k or ".attn2.to_v" in k]
    # text encoder and k/v are recomputed exactly; the other UNet layers reuse the earlier
    # concepts' captures, taken with the earlier fused encoder and k/v (the price of capturing
    # only the new concept)
    assert stage_difference(added, scratch, base, kv_keys) < 1e-3
    # at 64 px / 2 steps these layers see ~8 rows per concept, so the least-change solution moves
    # with small changes of those rows (measured 0.14-0.24 over concept draws); the sampling runs
    # below are what a user sees
    assert stage_difference(added, scratch, base, [k for k in changed if k not in kv_keys]) < 0.4
    text_base = reference.base_state(clip.cond_stage_model)
    text_added, text_scratch = loaded_weights(added_clip.patcher), loaded_weights(scratch_clip.patcher)
    text_keys = [k for k in text_base if not torch.equal(text_base[k], text_scratch[k])]
    assert len(text_keys) == 8
    assert stage_difference(text_added, text_scratch, text_base, text_keys) < 1e-3
    average_model, average_clip, _ = fuse(model, clip, concepts, "weight_average", **CAPTURE)
    for index, concept in enumerate(concepts):
        plain = capture_sample(model, clip, [], index)
        single = capture_sample(*apply_edlora(model, clip, concept.edlora, 1.0, 1.0), concept.words, index)
        scratch_run, added_run, average_run = (capture_sample(m, c, concept.words, index) for m, c in (
            (scratch_model, scratch_clip), (added_model, added_clip), (average_model, average_clip)))
        # reusing earlier captures moves the result far less than naive merging does
        # (measured 0.08-0.21 of weight averaging's difference) ...
        assert relative_error(added_run, scratch_run, plain) < 0.4 * relative_error(average_run, scratch_run, plain)
        # ... and keeps each identity as well as fusing from scratch (measured 0.95-1.05x)
        assert relative_error(added_run, single, plain) < 1.15 * relative_error(scratch_run, single, plain)


def test_adding_a_concept_under_the_default_rule_stays_within_the_originals_own_variability(tmp_path, model, clip,
                                                                                           concepts):
    """match_lbfgs (the node's default) predicts where the original's L-BFGS stops, which moves by
    2-4 % when one layer's statistics change by rounding (as L-BFGS itself does): incremental and
    from-scratch fusion then differ by about that much on text and k/v (measured 1.5 % / 1.6 %; the
    tolerance rule: < 0.1 %), and as much as with the tolerance rule on the other UNet layers."""
    first_model, first_clip, first_stats = fuse(model, clip, concepts[:2], "gradient", tolerance=None, **CAPTURE)
    save_fusion_stats(first_stats, str(tmp_path / "two.fusionstats"))
    reloaded = load_fusion_stats(str(tmp_path / "two.fusionstats"))
    assert reloaded.tolerance is None
    added_model, added_clip, _ = fuse(first_model, first_clip, concepts[2:], "gradient", tolerance=None,
                                      previous=reloaded, **CAPTURE)
    scratch_model, scratch_clip, _ = fuse(model, clip, concepts, "gradient", tolerance=None, **CAPTURE)
    base = reference.base_state(model.model)
    added, scratch = loaded_weights(added_model), loaded_weights(scratch_model)
    changed = [k for k in base if not torch.equal(base[k], scratch[k])]
    kv_keys = [k for k in changed if ".attn2.to_k" in k or ".attn2.to_v" in k]
    assert stage_difference(added, scratch, base, kv_keys) < 0.05
    assert stage_difference(added, scratch, base, [k for k in changed if k not in kv_keys]) < 0.4
    text_base = reference.base_state(clip.cond_stage_model)
    text_added, text_scratch = loaded_weights(added_clip.patcher), loaded_weights(scratch_clip.patcher)
    text_keys = [k for k in text_base if not torch.equal(text_base[k], text_scratch[k])]
    assert stage_difference(text_added, text_scratch, text_base, text_keys) < 0.05


def stage_difference(added, scratch, base, keys):
    """‖changes(incremental) − changes(scratch)‖ / ‖changes(scratch)‖ over a set of layers."""
    difference = sum(float((added[k].double() - scratch[k].double()).square().sum()) for k in keys)
    change = sum(float((scratch[k].double() - base[k].double()).square().sum()) for k in keys)
    return (difference / change) ** 0.5


def test_fusion_is_deterministic_for_a_seed(model, clip, concepts):
    quick = dict(CAPTURE, capture_steps=1, kv_positions="concept_and_eos")
    one = loaded_weights(fuse(model, clip, concepts[:1], "gradient", **quick)[0])
    two = loaded_weights(fuse(model, clip, concepts[:1], "gradient", **quick)[0])
    other_seed = loaded_weights(fuse(model, clip, concepts[:1], "gradient", **dict(quick, seed=8))[0])
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], other_seed[k]) for k in one)


@pytest.fixture
def one_block_concepts(model, clip):
    """Two seeded concepts with LoRA on the first transformer block's attention only (8 layers): the
    orthogonal merge optimises every layer for 300 Adam steps, minutes over all 136 layers here."""
    unet_shapes, _ = model_lora_shapes(model, clip)
    block = "down_blocks.0.attentions.0.transformer_blocks.0."
    shapes = {path: shape for path, shape in unet_shapes.items() if path.startswith(block)}
    return [Concept(random_edlora(WORDS[i], shapes, {}, seed=20 + i, embedding_scale=0.3, name=f"concept{i}.safetensors"),
                    1.0, 1.0) for i in range(2)]


@pytest.mark.parametrize("method", ["custom_diffusion", "orthogonal"])
def test_baselines_fuse_and_register_every_concept(model, clip, one_block_concepts, method):
    concepts = one_block_concepts
    fused_model, fused_clip, stats = fuse(model, clip, concepts, method, **dict(CAPTURE, capture_steps=1))
    assert stats is None and concepts_of(fused_clip).words == WORDS[0] + WORDS[1]
    assert torch.isfinite(capture_sample(fused_model, fused_clip, WORDS[1])).all()


def test_custom_diffusion_maps_concept_tokens_to_their_fine_tuned_outputs(model, clip, concepts):
    fused_model, fused_clip, _ = fuse(model, clip, concepts[:2], "custom_diffusion", **CAPTURE)
    base, fused = reference.base_state(model.model), loaded_weights(fused_model)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    for concept in concepts[:2]:
        rows = kv_inputs(fused_clip, concept.words, "concept_and_eos")[2]  # the rows it constrains
        delta = concept.edlora.unet["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"].delta(1.0)
        assert relative_error(rows @ fused[key].T, rows @ (base[key] + delta).T, rows @ base[key].T) < 1e-2


def test_errors_are_clear(tmp_path, model, clip, concepts):
    with pytest.raises(ValueError, match="concepts: the list is empty"):
        fuse(model, clip, [], "gradient", **CAPTURE)
    with pytest.raises(ConceptCollisionError, match="word <a1> is already used by concept0.safetensors"):
        add_concept(add_concept([], concepts[0]), concepts[0])
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    wide = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320)}
    other = Concept(random_edlora(["<z1>"], wide, text_shapes, name="real_sd15.pth"), 1.0, 1.0)
    with pytest.raises(ModelMismatchError, match=r"real_sd15.pth: unet layer .* is \[320, 320\] in the file"):
        fuse(model, clip, [other], "gradient", **CAPTURE)
    _, known_clip = apply_edlora(model, clip, concepts[0].edlora, 1.0, 1.0)
    with pytest.raises(ConceptCollisionError, match="word <a1> is already provided"):
        fuse(model, known_clip, concepts[:1], "weight_average", **CAPTURE)
    (tmp_path / "bad.fusionstats").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(FusionStatsError, match="bad.fusionstats"):
        load_fusion_stats(str(tmp_path / "bad.fusionstats"))
    with pytest.raises(ValueError, match="needs method 'gradient'"):
        fuse(model, clip, concepts[:1], "orthogonal", previous=object(), **CAPTURE)


def test_rename_gives_a_colliding_concept_new_words(concepts):
    renamed = concepts[0].edlora.renamed(parse_rename("<a1>=<d1>, <a2> = <d2>", concepts[0].words, "x"))
    both = add_concept(add_concept([], concepts[0]), Concept(renamed, 1.0, 1.0))
    assert [c.words for c in both] == [WORDS[0], ["<d1>", "<d2>"]]
    with pytest.raises(ValueError, match="rename: x has no word <q1>"):
        parse_rename("<q1>=<r1>", concepts[0].words, "x")
    with pytest.raises(ValueError, match="must look like <old>=<new>"):
        parse_rename("a1=b1", concepts[0].words, "x")
    assert "rename" in EDLoRAConcept.INPUT_TYPES()["required"]


def test_lambda_rule_defaults_to_match_lbfgs_and_old_graphs_keep_the_tolerance(tmp_path, model, clip, concepts):
    """New nodes get match_lbfgs; a graph saved before the input existed (no value) keeps the
    tolerance rule it ran with, and 'tolerance' stays selectable."""
    assert GradientFuse.INPUT_TYPES()["optional"]["lambda_rule"][1]["default"] == "match_lbfgs"
    node, quick = GradientFuse(), dict(CAPTURE, capture_steps=1, seed=0, kv_positions="all")
    default = node.fuse(model, clip, concepts[:2], "gradient", fusion_tolerance=1e-3, **quick)
    explicit = node.fuse(model, clip, concepts[:2], "gradient", fusion_tolerance=1e-3, lambda_rule="tolerance", **quick)
    assert explicit[2].tolerance == 1e-3
    matched = node.fuse(model, clip, concepts[:2], "gradient", fusion_tolerance=1e-3, lambda_rule="match_lbfgs",
                        **quick)
    assert default[2].tolerance == 1e-3 and matched[2].tolerance is None
    save_fusion_stats(default[2], str(tmp_path / "a.fusionstats"))
    save_fusion_stats(matched[2], str(tmp_path / "b.fusionstats"))
    assert load_fusion_stats(str(tmp_path / "a.fusionstats")).tolerance == 1e-3
    assert load_fusion_stats(str(tmp_path / "b.fusionstats")).tolerance is None
    path = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    base = reference.base_state(model.model)[key].double()
    for fused, solver in ((default, lambda stats: solve(stats, 1e-3, dtype=torch.float64)[0]),
                          (matched, lambda stats: solve_like_lbfgs(stats, 500, dtype=torch.float64)[0])):
        change = solver(fused[2].layers[f"unet:{path}"])
        assert torch.allclose(loaded_weights(fused[0])[key].double() - base, change, atol=1e-6)
    with pytest.raises(ValueError, match="lambda_rule"):
        node.fuse(model, clip, concepts[:1], "gradient", fusion_tolerance=1e-3, lambda_rule="lbfgs", **quick)


def test_progress_names_stage_concept_step_and_layer_with_time_left(monkeypatch, model, clip, concepts):
    shown = []
    monkeypatch.setattr(progress_module, "progress_text", shown.append)
    monkeypatch.setattr(progress_module, "MIN_TEXT_INTERVAL", 0.0)
    fuse(model, clip, concepts[:2], "gradient", **dict(CAPTURE, capture_steps=2))
    stages = [text.split(":")[0] for text in shown]
    order = ["text encoder", "cross-attention k/v", "UNet layers"]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == order
    names = [c.edlora.name for c in concepts[:2]]
    assert f"text encoder: concept 2/2 ({names[1]})" in " ".join(shown)
    assert any(t.startswith(f"UNet layers: concept 1/2 ({names[0]}), sampling step 2/2") for t in shown)
    assert any(t.startswith("cross-attention k/v: solving layer 32/32") for t in shown)
    assert any("left)" in t for t in shown) and shown[-1].endswith(f"({2 * 2 + 2 * 2 + 8 + 32 + 96}/"
                                                                  f"{2 * 2 + 2 * 2 + 8 + 32 + 96})")
