"""EDLoRA Train on the tiny SD1.5-topology host models with generated images."""
import os

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfyui_mixofshow.harness import models
from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.harness.fusion_checks import loaded_weights
from comfyui_mixofshow.mixofshow_core import sd15
from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora, save_edlora
from comfyui_mixofshow.mixofshow_core.training.dataset import DatasetError
from comfyui_mixofshow.mixofshow_core.training.loop import EDLoRATraining, TrainingConfig, run_training
from comfyui_mixofshow.nodes.edlora_concept import EDLoRAConcept
from comfyui_mixofshow.nodes.edlora_loader import EDLoRALoader, apply_edlora
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise
from comfyui_mixofshow.nodes import compat, edlora_train
from comfyui_mixofshow.nodes.edlora_train import (EDLoRATrain, host_training, initial_tables, trained_edlora)
from comfyui_mixofshow.nodes.fusion_capture import kv_inputs
from comfyui_mixofshow.nodes.gradient_fuse import GradientFuse
from comfyui_mixofshow.nodes.layerwise import CONTEXT_KEY

from .interrupts import (CurrentInterrupt, hooked_modules, press_interrupt_on_call, raise_in_every_op,
                         server_progress_hook)
from .sampling import c_in, denoise_once

WORDS = ("<t1>", "<t2>")
CAPTION = "<TOK>, red shirt, smiling"
MID_TO_K = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
# weights a user's LoRA changed before EDLoRA Train: LoRA targets of training and other layers
USER_PATCHED = {"unet": ("diffusion_model.", [MID_TO_K, "diffusion_model.input_blocks.0.0.weight",
                                              "diffusion_model.output_blocks.3.0.skip_connection.bias"]),
                "text": ("clip_l.transformer.", ["clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
                                                 "clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight",
                                                 "clip_l.transformer.text_model.final_layer_norm.bias"])}


def write_dataset(folder, sizes=((64, 96), (96, 64)), masks=True):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        (folder / "images" / f"{i}.txt").write_text(CAPTION)
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
        if masks:
            Image.fromarray(mask, "L").save(folder / "masks" / f"{i}.png")
    return str(folder / "images"), str(folder / "masks")


def node_inputs(images, masks, **overrides):
    inputs = dict(dataset_folder=images, placeholder="<TOK>", concept_word_1=WORDS[0], concept_word_2=WORDS[1],
                  initializer_1="<rand-0.013>", initializer_2="man", steps=2, repeats=1, batch_size=1, resolution=64,
                  lr_embedding=1e-3, lr_text_encoder=1e-5, lr_unet=1e-4, rank=4, noise_offset=0.01, masked_loss=True,
                  attn_reg_weight=0.01, reg_full_identity=False, emb_norm_threshold=0.55, caption_template="human",
                  shuffle_caption=True, seed=3, save_every=1, output_name="concept", preview_every=1,
                  preview_prompt="a photo of <TOK>", preview_steps=1, gradient_checkpointing=False, precision="fp32",
                  also_save_pth=True, masks_folder=masks, resume="")
    inputs.update(overrides)
    return inputs


@pytest.fixture(scope="module", autouse=True)
def input_folder(tmp_path_factory):
    """ComfyUI's input folder is pytest's temporary root: the datasets' tmp_path folders lie inside it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(folder_paths, "input_directory", str(tmp_path_factory.getbasetemp()))
        yield


@pytest.fixture(scope="module")
def host_models():
    with torch.inference_mode():
        return models.tiny_model(), models.tiny_clip(), models.tiny_vae()


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """models/edlora and the output folder redirected to a temporary folder for this module."""
    root = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "edlora", ([str(root / "edlora")], {".safetensors", ".pth"}))
        patch.setattr(folder_paths, "output_directory", str(root / "output"))
        yield root


@pytest.fixture(scope="module")
def dataset(places):
    return write_dataset(places / "data")


def weights(patcher):
    return {k: v.clone() for k, v in patcher.model.state_dict().items()}


def with_user_patches(model, clip, seed=7):
    """(MODEL clone, CLIP clone, {key: delta}): the changes a LoRA loader leaves, as ("diff", …) weight patches."""
    generator = torch.Generator().manual_seed(seed)
    patched = {"unet": model.clone(), "text": clip.clone()}
    deltas = {}
    for part, (_, keys) in USER_PATCHED.items():
        state = (patched[part] if part == "unet" else patched[part].patcher).model.state_dict()
        changes = {k: 0.05 * torch.randn(state[k].shape, generator=generator) for k in keys}
        patched[part].add_patches({k: ("diff", (d,)) for k, d in changes.items()})
        deltas.update(changes)
    return patched["unet"], patched["text"], deltas


@pytest.fixture(scope="module")
def trained(host_models, dataset, places):
    """One node run: 2 steps, state and intermediate ED-LoRA at step 1, previews at step 1 and the end."""
    model, clip, vae = host_models
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        before = weights(model), weights(clip.patcher)
        outputs = EDLoRATrain().train(model, clip, vae, **node_inputs(*dataset))
        comfy.model_management.unload_all_models()
        after = weights(model), weights(clip.patcher)
    return outputs, before, after


def config(**overrides):
    settings = dict(total_steps=2, words=WORDS, batch_size=1, resolution=64, seed=3)
    settings.update(overrides)
    return TrainingConfig(**settings)


def load_samples(images, masks=None):
    from comfyui_mixofshow.mixofshow_core.training.dataset import load_dataset
    return load_dataset(images, "<TOK>", 64, masks)


def test_lora_sits_exactly_on_the_layers_the_original_trains(host_models, dataset):
    model, clip, vae = host_models
    samples = load_samples(*dataset)
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(clip, WORDS, ("<rand-0.013>", "man"), 0)
        with host_training(model, clip, vae, samples, config(), tables, 4, False) as training:
            unet, text = training.adapters["unet"], training.adapters["text"]
            expected_unet = {f"{block}.transformer_blocks.0.{attn}.{linear}" for block in sd15.CROSS_ATTN_BLOCKS
                             for attn in ("attn1", "attn2") for linear in ("to_q", "to_k", "to_v", "to_out.0")}
            expected_text = {f"text_model.encoder.layers.{i}.self_attn.{linear}" for i in range(2)
                             for linear in ("q_proj", "k_proj", "v_proj", "out_proj")}
            assert set(unet) == expected_unet and len(unet) == 128
            assert set(text) == expected_text and len(text) == 8  # the tiny CLIP has 2 of SD1.5's 12 layers
            assert unet[f"{sd15.CROSS_ATTN_BLOCKS[6]}.transformer_blocks.0.attn2.to_k"].down.shape == (4, 768)
            assert unet[f"{sd15.CROSS_ATTN_BLOCKS[2]}.transformer_blocks.0.attn1.to_q"].down.shape == (4, 64)
            assert all(a.down.shape == (4, 768) and a.up.shape == (768, 4) for a in text.values())


def test_every_trainable_tensor_gets_a_gradient_and_checkpointing_gives_the_same(host_models, dataset):
    model, clip, vae = host_models
    samples = load_samples(*dataset)
    results = []
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(clip, WORDS, ("<rand-0.013>", "man"), 0)
        for checkpointing in (False, True):
            with host_training(model, clip, vae, samples, config(), tables, 4, checkpointing) as training:
                with torch.no_grad():
                    for adapter in list(training.adapters["unet"].values()) + list(training.adapters["text"].values()):
                        adapter.up.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
                loss = training.loss(0)
                loss.backward()
                # at 64 px the middle block's self-attention sees one token: its q and k cannot matter
                single_token = {f"{sd15.CROSS_ATTN_BLOCKS[6]}.transformer_blocks.0.attn1.{n}" for n in ("to_q", "to_k")}
                params = list(training.embeddings.values()) + [p for part in training.adapters.values()
                                                               for name, a in part.items() if name not in single_token
                                                               for p in (a.down, a.up)]
                assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
                results.append((loss.item(), [p.grad.clone() for p in params]))
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    assert plain_loss == pytest.approx(ckpt_loss, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(plain_grads, ckpt_grads))


def test_training_encodes_and_predicts_like_the_loaded_edlora_at_inference(host_models, dataset):
    """Text: the training path equals EDLoRA Text Encode on the LoRA-patched CLIP, layer by layer
    (bit-identical without LoRA). UNet: the training prediction equals the host sampler's on the
    patched, routed MODEL."""
    model, clip, vae = host_models
    samples = load_samples(dataset[0])
    prompt = "a photo of <t1> <t2>, red shirt"
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(clip, WORDS, ("<rand-0.013>", "man"), 0)
        settings = config(total_steps=1, lr_embedding=5e-2, lr_text_lora=5e-2, lr_unet_lora=5e-2)
        with host_training(model, clip, vae, samples, settings, tables, 4, False) as training:
            run_training(training)
            edlora = trained_edlora(training, "check")
            with torch.inference_mode():
                patched_model, patched_clip = apply_edlora(model, clip, edlora, 1.0, 1.0)
                cond = encode_layerwise(patched_clip, prompt)
                stack = cond[0][1]["model_conds"][CONTEXT_KEY].cond.clone()
                _, plain_clip = apply_edlora(model, clip, edlora, 0.0, 0.0)
                without_lora = encode_layerwise(plain_clip, prompt)[0][1]["model_conds"][CONTEXT_KEY].cond.clone()
                x, denoised, sigma = (v.clone() if torch.is_tensor(v) else v
                                      for v in denoise_once(patched_model, cond, cond, 1.0, t=500))
                timestep = model.model.model_sampling.timestep(torch.tensor([sigma])).clone()
            with torch.no_grad():
                contexts, positions = training.model.encode_text([prompt], training.embeddings)
                eps = training.model.predict(x * c_in(sigma), timestep, contexts)
    assert positions.tolist() == [[4, 5]]  # after the start token and "a photo of"
    # the host keeps this CLIP in fp16, so its merged W + ΔW is rounded to fp16; training adds ΔW in fp32
    error, lora_effect = (contexts.stack - stack).abs().max(), (stack - without_lora).abs().max()
    assert error < 5e-3 and lora_effect > 20 * error
    assert not torch.allclose(stack[:, 0], stack[:, 15], atol=1e-3), "layers must differ for this test"
    assert torch.allclose(denoised, x - sigma * eps, atol=2e-3)


def test_node_writes_an_edlora_the_loader_and_text_encode_accept(trained, host_models, places):
    outputs, _, _ = trained
    name, curve, previews = outputs["result"]
    model, clip, _ = host_models
    assert name == "concept.safetensors" and outputs["ui"] == {"text": [name]}  # shown on the node, in /history
    edlora = load_edlora(str(places / "edlora" / name))
    assert edlora.words == list(WORDS) and edlora.rank == 4
    assert len(edlora.unet) == 128 and len(edlora.text_encoder) == 8
    assert load_edlora(str(places / "edlora" / "concept.pth")).words == list(WORDS)
    with torch.inference_mode():
        patched_model, patched_clip = EDLoRALoader().load(model, clip, name, 0.7, 0.7)
        cond = encode_layerwise(patched_clip, "a photo of <t1> <t2> on a beach")
    assert cond[0][1]["model_conds"][CONTEXT_KEY].cond.shape == (1, 16, 77, 768)
    assert curve.shape == (1, 320, 512, 3) and previews.shape == (6, 64, 64, 3)  # α 0/0.7/1 at step 1 and 2
    assert torch.isfinite(previews).all() and 0 <= previews.min() and previews.max() <= 1


def test_trained_edlora_goes_through_gradient_fusion(trained, host_models, places):
    """The trained file and a second concept, chained by EDLoRA Concept nodes, fuse; the fused
    cross-attention k layer maps the trained concept's own token features like W0 + ΔW of the
    trained file (plain torch on its tensors)."""
    model, clip, _ = host_models
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    # a partner whose LoRA is as small as two training steps make it (fusion's tolerance is
    # relative to the whole objective, so a large partner would hide the trained change)
    save_edlora(random_edlora(["<o1>", "<o2>"], unet_shapes, text_shapes, seed=5, lora_scale=1e-3),
                str(places / "edlora" / "other.safetensors"))
    with torch.inference_mode():
        concepts = EDLoRAConcept().add("concept.safetensors", 1.0, 1.0, "")[0]
        concepts = EDLoRAConcept().add("other.safetensors", 1.0, 1.0, "", concepts)[0]
        fused_model, fused_clip, stats = GradientFuse().fuse(model, clip, concepts, "gradient", 1, 64, 0, "all", 1e-6)
        # 2 prompts x 77 positions; the tokens before the concept words ("<start> photo of a" and
        # "<start>") read the same in every concept's prompts (causal attention): fusion can only
        # average those rows, every other row is the trained concept's own
        rows = kv_inputs(fused_clip, list(WORDS))[6]
        rows = torch.cat([rows[4:77], rows[78:]])
        fused = loaded_weights(fused_model)[MID_TO_K]
        comfy.model_management.unload_all_models()  # restores the shared base weights
        cond = encode_layerwise(fused_clip, "a photo of <t1> <t2> and <o1> <o2>")
    assert stats.words == [*WORDS, "<o1>", "<o2>"]
    assert cond[0][1]["model_conds"][CONTEXT_KEY].cond.shape == (1, 16, 77, 768)
    saved = load_file(str(places / "edlora" / "concept.safetensors"))
    down, up = (saved[f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_{p}.weight"].double()
                for p in ("down", "up"))
    base = weights(model)[MID_TO_K].double()
    rows = rows.double()
    target, start = rows @ (base + up @ down).T, rows @ base.T
    assert (target - start).norm() > 1e-4 * start.norm()  # the trained LoRA changes this layer
    error = (rows @ fused.double().T - target).norm() / (target - start).norm()
    assert error < 1e-2, error  # measured 1.9e-3


def test_node_saves_intermediate_edloras_and_states(trained, places):
    assert os.path.isfile(places / "edlora" / "concept_steps" / "concept-000001.safetensors")
    assert os.path.isfile(places / "output" / "edlora_training" / "concept" / "state-000001.safetensors")
    assert load_edlora(str(places / "edlora" / "concept_steps" / "concept-000001.safetensors")).rank == 4


def test_base_model_and_token_embeddings_stay_bit_identical(trained, host_models):
    _, (model_before, clip_before), (model_after, clip_after) = trained
    model, clip, _ = host_models
    assert model_before.keys() == model_after.keys() and clip_before.keys() == clip_after.keys()
    assert all(torch.equal(model_before[k], model_after[k]) for k in model_before)
    assert all(torch.equal(clip_before[k], clip_after[k]) for k in clip_before)
    token_embedding = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
    assert clip_after[token_embedding].shape == (49408, 768)
    assert hooked_modules(model.model) == [] and hooked_modules(clip.cond_stage_model) == []


def test_training_runs_on_the_users_patched_weights_and_leaves_model_and_clip_untouched(host_models, dataset):
    """A MODEL and CLIP with a user's LoRA-like patches: before any step (LoRA adds exactly zero)
    the training text path equals EDLoRA Text Encode on the patched CLIP bit for bit, the UNet
    prediction equals the host sampler's on the patched MODEL, and the unpatched models differ."""
    model, clip, vae = host_models
    patched_model, patched_clip, _ = with_user_patches(model, clip)
    prompt = "a photo of <t1> <t2>, red shirt"
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        before = weights(model), weights(clip.patcher)
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(patched_clip, WORDS, ("<rand-0.013>", "man"), 0)
        with host_training(patched_model, patched_clip, vae, load_samples(dataset[0]), config(total_steps=1), tables,
                           4, False) as training:
            hooked = hooked_modules(model.model) + hooked_modules(clip.cond_stage_model)
            edlora = trained_edlora(training, "untrained")
            host = {}
            with torch.inference_mode():
                for name, (m, c) in {"patched": (patched_model, patched_clip), "plain": (model, clip)}.items():
                    routed, text = apply_edlora(m, c, edlora, 1.0, 1.0)
                    cond = encode_layerwise(text, prompt)
                    x, denoised, sigma = (v.clone() if torch.is_tensor(v) else v
                                          for v in denoise_once(routed, cond, cond, 1.0, t=500))
                    host[name] = cond[0][1]["model_conds"][CONTEXT_KEY].cond.clone(), denoised
                timestep = model.model.model_sampling.timestep(torch.tensor([sigma])).clone()
            with torch.no_grad():
                contexts, _ = training.model.encode_text([prompt], training.embeddings)
                eps = training.model.predict(x * c_in(sigma), timestep, contexts)
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        after = weights(model), weights(clip.patcher)
    (patched_contexts, patched_denoised), (plain_contexts, plain_denoised) = host["patched"], host["plain"]
    assert torch.equal(contexts.stack, patched_contexts)
    assert (plain_contexts - patched_contexts).abs().max() > 0.1
    error, effect = (patched_denoised - (x - sigma * eps)).abs().max(), (plain_denoised - patched_denoised).abs().max()
    assert error < 1e-5 and effect > 100 * error  # measured 1.2e-7 and 6.6e-3
    assert hooked == []
    for was, now in zip(before, after):
        assert was.keys() == now.keys() and all(torch.equal(was[k], now[k]) for k in was)


@pytest.mark.parametrize("part", ["unet", "text"])
def test_patched_weights_hold_every_weight_patch_and_leave_the_model_as_it_was(host_models, part):
    """compat.patched_weights on this host: W + delta where the patcher has a patch (added in fp32,
    stored in the weight's dtype: this CLIP keeps fp16), W elsewhere."""
    model, clip, _ = host_models
    patched_model, patched_clip, deltas = with_user_patches(model, clip)
    patcher = patched_model if part == "unet" else patched_clip.patcher
    prefix = USER_PATCHED[part][0]
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        base = {k: v.clone() for k, v in patcher.model.state_dict().items() if k.startswith(prefix)}
        got = {name: t.clone() for name, t in compat.patched_weights(patcher, prefix, torch.device("cpu"))}
        comfy.model_management.unload_all_models()
        after = {k: v.clone() for k, v in patcher.model.state_dict().items() if k.startswith(prefix)}
    assert got.keys() == {k[len(prefix):] for k in base}
    for key, weight in base.items():
        expected = (weight.float() + deltas[key]).to(weight.dtype) if key in deltas else weight
        assert torch.equal(got[key[len(prefix):]], expected), key
        assert torch.equal(after[key], weight), key


def test_training_mode_sets_the_hosts_training_flag_only_while_open(monkeypatch):
    assert not hasattr(comfy.model_management, "in_training")  # the hosts here have none: nothing is added
    with compat.training_mode():
        assert not hasattr(comfy.model_management, "in_training")
    monkeypatch.setattr(comfy.model_management, "in_training", False, raising=False)  # ComfyUI 0.38's flag
    with pytest.raises(CurrentInterrupt), compat.training_mode():
        assert comfy.model_management.in_training is True
        raise CurrentInterrupt()
    assert comfy.model_management.in_training is False


def resume_gives_the_uninterrupted_file(host_models, inputs, places):
    model, clip, vae = host_models
    with torch.inference_mode():
        EDLoRATrain().train(model, clip, vae, **{**inputs, "resume": "latest"})
    resumed = load_file(str(places / "edlora" / f"{inputs['output_name']}.safetensors"))
    uninterrupted = load_file(str(places / "edlora" / "concept.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def saved_states(places, name):
    return sorted(p.name for p in (places / "output" / "edlora_training" / name).iterdir())


def test_interrupt_from_the_progress_hook_saves_the_step_and_resumes_to_the_uninterrupted_result(
        trained, host_models, dataset, places):
    """The server's hook raises from inside the node's progress report after step 1 (no periodic
    saves): the state of step 1 is saved, the host's exception goes on to the executor."""
    model, clip, vae = host_models
    inputs = node_inputs(*dataset, output_name="resumed", save_every=0, preview_every=0, also_save_pth=False)
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(server_progress_hook(interrupt_at=1))
    try:
        with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
            EDLoRATrain().train(model, clip, vae, **inputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert saved_states(places, "resumed") == ["state-000001.safetensors"]
    assert not (places / "edlora" / "resumed.safetensors").exists()
    resume_gives_the_uninterrupted_file(host_models, inputs, places)


def test_interrupt_raised_inside_an_op_saves_the_last_completed_step(trained, host_models, dataset, places,
                                                                    monkeypatch):
    """ComfyUI 0.38: a BaseException from the next op, here in the middle of step 2's UNet forward."""
    model, clip, vae = host_models
    raise_in_every_op(monkeypatch)
    inputs = node_inputs(*dataset, output_name="op_interrupted", save_every=0, preview_every=0, also_save_pth=False)
    with monkeypatch.context() as patch:
        calls = press_interrupt_on_call(patch, edlora_train, "unet_forward", call=2)
        with torch.inference_mode(), pytest.raises(CurrentInterrupt):
            EDLoRATrain().train(model, clip, vae, **inputs)
    assert len(calls) == 2 and not comfy.model_management.processing_interrupted()
    assert saved_states(places, "op_interrupted") == ["state-000001.safetensors"]
    assert not (places / "edlora" / "op_interrupted.safetensors").exists()
    resume_gives_the_uninterrupted_file(host_models, inputs, places)


@pytest.mark.parametrize("case, message", [
    ("empty folder", "no images"),
    ("unreadable image", "2.png: cannot be read as an image"),
    ("caption without placeholder", r"1.txt: the caption \(first line\) does not contain the placeholder <TOK>"),
    ("mask size mismatch", "mask is 32x32 but 0.png is 64x96"),
])
def test_bad_datasets_fail_clearly_before_any_step(tmp_path, host_models, monkeypatch, case, message):
    model, clip, vae = host_models
    images, masks = write_dataset(tmp_path)
    if case == "empty folder":
        images = str(tmp_path / "masks")
        masks = ""
        for name in os.listdir(images):
            os.remove(os.path.join(images, name))
    elif case == "unreadable image":
        (tmp_path / "images" / "2.png").write_bytes(b"\x89PNG broken")
    elif case == "caption without placeholder":
        (tmp_path / "images" / "1.txt").write_text("a dog")
    elif case == "mask size mismatch":
        Image.new("L", (32, 32)).save(tmp_path / "masks" / "0.png")
    monkeypatch.setattr(EDLoRATraining, "train_step", lambda self: pytest.fail("a training step ran"))
    with torch.inference_mode(), pytest.raises(DatasetError, match=message):
        EDLoRATrain().train(model, clip, vae, **node_inputs(images, masks))


@pytest.mark.parametrize("overrides, message", [
    ({"initializer_2": "two words"}, "initializer 'two words'"),
    ({"initializer_2": "mixofshowness"}, "not a single token"),
    ({"concept_word_2": "<t1>"}, "must differ"),
    ({"resolution": 96}, "multiple of 64"),
    ({"output_name": "../escape"}, "output_name"),
    ({"resume": "latest", "output_name": "never_trained"}, "no saved state"),
])
def test_bad_settings_fail_clearly_before_any_step(tmp_path, host_models, monkeypatch, overrides, message):
    model, clip, vae = host_models
    monkeypatch.setattr(EDLoRATraining, "train_step", lambda self: pytest.fail("a training step ran"))
    with torch.inference_mode(), pytest.raises(ValueError, match=message):
        EDLoRATrain().train(model, clip, vae, **node_inputs(*write_dataset(tmp_path), **overrides))


def test_too_long_caption_fails_before_any_step(tmp_path, host_models, monkeypatch):
    model, clip, vae = host_models
    images, masks = write_dataset(tmp_path)
    (tmp_path / "images" / "1.txt").write_text("<TOK>, " + ", ".join(["a very long detail"] * 20))
    monkeypatch.setattr(EDLoRATraining, "train_step", lambda self: pytest.fail("a training step ran"))
    with torch.inference_mode(), pytest.raises(ValueError, match="1.png: caption is too long"):
        EDLoRATrain().train(model, clip, vae, **node_inputs(images, masks))


def test_loss_decreases_on_a_fixed_batch(host_models, dataset):
    model, clip, vae = host_models
    samples = load_samples(dataset[0])[:1]
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(clip, WORDS, ("<rand-0.013>", "man"), 0)
        settings = config(total_steps=4, lr_unet_lora=1e-2, lr_text_lora=1e-2, lr_embedding=1e-2, attn_reg_weight=0.0)
        with host_training(model, clip, vae, samples, settings, tables, 4, False) as training:
            fixed = training.loss
            training.loss = lambda step: fixed(0)
            run_training(training)
    losses = training.losses
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses


def test_workflows_match_the_node_inputs():
    import json
    from comfyui_mixofshow.harness.host import ROOT
    types = EDLoRATrain.INPUT_TYPES()
    inputs = {**types["required"], **types["optional"]}
    widgets = [n for n, spec in inputs.items() if spec[0] not in ("MODEL", "CLIP", "VAE")]
    api = json.loads((ROOT / "workflows" / "api" / "edlora_train_api.json").read_text())
    train = next(node for node in api.values() if node["class_type"] == "MixOfShowEDLoRATrain")
    assert set(train["inputs"]) == set(inputs)
    for name in widgets:
        kind, value = inputs[name][0], train["inputs"][name]
        if isinstance(kind, list):
            assert value in kind, name
        else:
            assert isinstance(value, {"STRING": str, "INT": int, "FLOAT": float, "BOOLEAN": bool}[kind]), name
    ui = json.loads((ROOT / "workflows" / "edlora_train.json").read_text())
    node = next(node for node in ui["nodes"] if node["type"] == "MixOfShowEDLoRATrain")
    assert len(node["widgets_values"]) == len(widgets) + 1  # the seed widget's control_after_generate
    expected = [train["inputs"][n] for n in widgets]
    expected.insert(widgets.index("seed") + 1, "fixed")
    assert node["widgets_values"] == expected
