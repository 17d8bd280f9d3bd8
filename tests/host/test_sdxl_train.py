"""EDLoRA Train on the tiny SDXL-topology host models (70 cross-attention blocks, clip_l + clip_g)
against a plain-torch reference, then through EDLoRA Loader, a stock KSampler, interrupt and resume."""
import copy
import re

import comfy.model_management
import comfy.utils
import nodes as comfy_nodes
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfyui_mixofshow.harness import models, sdxl_models, workflows
from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora
from comfyui_mixofshow.mixofshow_core.families import SDXL
from comfyui_mixofshow.mixofshow_core.training import loop
from comfyui_mixofshow.mixofshow_core.training.dataset import load_dataset
from comfyui_mixofshow.mixofshow_core.training.loop import TrainingConfig
from comfyui_mixofshow.nodes.edlora_loader import EDLoRALoader
from comfyui_mixofshow.nodes.edlora_text_encode import encode_layerwise
from comfyui_mixofshow.nodes.edlora_train import EDLoRATrain, host_training, initial_tables
from comfyui_mixofshow.nodes.layerwise import CONTEXT_KEY
from comfyui_mixofshow.nodes.model_keys import unet_weight_keys

from . import reference, sdxl_reference
from .interrupts import server_progress_hook
from .server_runs import assert_ui_matches_api, prepared_server, running, workflow_pair
from .test_edlora_train import WORDS, input_folder, node_inputs, places, write_dataset  # noqa: F401 (fixtures)

LAST_CLIP_L_LAYER = "text_model.encoder.layers.2."  # the tiny clip_l has 3 layers
IMAGE_SIZE = (64, 96)  # width, height of the one training image: SDXL's original size is (96, 64)


@pytest.fixture(scope="module")
def host_models():
    with torch.inference_mode():
        return sdxl_models.tiny_sdxl_model(), sdxl_models.tiny_sdxl_clip(), models.tiny_vae()


@pytest.fixture(scope="module")
def dataset(places):
    return write_dataset(places / "data", sizes=(IMAGE_SIZE,))


def sdxl_inputs(images, masks, **overrides):
    return node_inputs(images, masks, **{"also_save_pth": False, "output_name": "sdxl_concept",
                                         "granularity": "transformer", **overrides})


@pytest.fixture(scope="module")
def trained(host_models, dataset, places):
    """One node run: 2 steps, a state and an intermediate ED-LoRA at step 1, previews at step 1 and the end."""
    model, clip, vae = host_models
    with torch.inference_mode():
        return EDLoRATrain().train(model, clip, vae, **sdxl_inputs(*dataset))


def config(**overrides):
    return TrainingConfig(**{"total_steps": 1, "words": WORDS, "batch_size": 1, "resolution": 64, "seed": 3,
                             **overrides})


def test_lora_sits_on_all_70_blocks_and_both_text_encoders(host_models, dataset):
    model, clip, vae = host_models
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(clip, WORDS, ("<rand-0.013>", "man"), 0)
        with host_training(model, clip, vae, load_dataset(*dataset[:1], "<TOK>", 64), config(), tables, 4,
                           False) as training:
            adapters = training.adapters
    blocks = [f"{t}.transformer_blocks.{b}" for t, depth in
              [("down_blocks.1.attentions.0", 2), ("down_blocks.1.attentions.1", 2),
               ("down_blocks.2.attentions.0", 10), ("down_blocks.2.attentions.1", 10), ("mid_block.attentions.0", 10)]
              + [(f"up_blocks.0.attentions.{k}", 10) for k in range(3)]
              + [(f"up_blocks.1.attentions.{k}", 2) for k in range(3)] for b in range(depth)]
    assert set(adapters["unet"]) == {f"{block}.{attn}.{linear}" for block in blocks for attn in ("attn1", "attn2")
                                     for linear in ("to_q", "to_k", "to_v", "to_out.0")}
    assert len(adapters["unet"]) == 560
    assert adapters["unet"]["mid_block.attentions.0.transformer_blocks.9.attn2.to_k"].down.shape == (4, 2048)
    text = {f"text_model.encoder.layers.{i}.self_attn.{n}" for i in range(3) for n in ("q_proj", "k_proj", "v_proj",
                                                                                       "out_proj")}
    assert set(adapters["text"]) == text and set(adapters["text_2"]) == text  # the tiny encoders have 3 layers
    assert all(a.down.shape == (4, 768) for a in adapters["text"].values())
    assert all(a.down.shape == (4, 1280) and a.up.shape == (1280, 4) for a in adapters["text_2"].values())
    assert {tuple(t.shape) for t in tables.values()} == {(SDXL.num_rows(SDXL.default_granularity), 2048)}


class Recorder:
    """Records what one training loss saw: the prompt, noisy latents, timesteps, sizes, target and mask."""

    def __init__(self, training, monkeypatch):
        self.seen = {}
        model = training.model
        encode, predict, mse = model.encode_text, model.predict, loop.masked_mse

        def encode_text(prompts, tables):
            self.seen["prompts"] = list(prompts)
            return encode(prompts, tables)

        def record_predict(x, timesteps, text, sizes):
            self.seen.update(x=x.detach().clone(), timesteps=timesteps.clone(), sizes=sizes.clone())
            return predict(x, timesteps, text, sizes)

        def masked_mse(prediction, target, mask):
            self.seen.update(target=target.detach().clone(), mask=mask.clone())
            return mse(prediction, target, mask)

        monkeypatch.setattr(model, "encode_text", encode_text)
        monkeypatch.setattr(model, "predict", record_predict)
        monkeypatch.setattr(loop, "masked_mse", masked_mse)


def merged(state, adapters, key_of):
    """state (float32) with W + up @ down for every adapter, differentiable in the adapters."""
    out = dict(state)
    for path, adapter in adapters.items():
        out[key_of(path)] = state[key_of(path)] + adapter.up @ adapter.down
    return out


def reference_loss(model, clip, training, seen):
    """Masked ε-MSE of one step written out: both encoders (LoRA merged into W) on each layer's
    copy of the prompt, clip_l ‖ clip_g penultimate contexts per layer, the projected clip_g pooled
    output of copy 0 with sinusoidal embeddings of (96, 64) original size, (0, 0) crop and (64, 64)
    target, and the host UNet module (LoRA merged) with layer l's context injected into attn2 l."""
    with torch.inference_mode():
        text_base = reference.base_state(clip.cond_stage_model)
        unet_base = reference.base_state(model.model)
    text_state = {k: v.clone().float() for k, v in text_base.items()}  # own tensors, outside inference mode
    text_state = merged(text_state, training.adapters["text"], lambda p: f"clip_l.transformer.{p}.weight")
    text_state = merged(text_state, training.adapters["text_2"], lambda p: f"clip_g.transformer.{p}.weight")
    rows = SDXL.layer_rows(training.granularity)
    tables = {w: t[rows] for w, t in training.embeddings.items()}
    (prompt,) = seen["prompts"]
    pieces = [tables.get(p, p) for p in (p.strip() for p in re.split("(<t1>|<t2>)", prompt)) if p]
    tokenizer = reference.hf_tokenizer()
    encoded = [sdxl_reference.context_and_pooled(text_state, tokenizer, pieces, layer) for layer in range(70)]
    contexts, pooled = [c for c, _ in encoded], encoded[0][1]
    sizes = torch.cat([sdxl_reference.sinusoid(v) for v in (96, 64, 0, 0, 64, 64)])
    y = torch.cat([pooled, sizes[None]], dim=1)

    keys = unet_weight_keys(model)
    params = {k[len("diffusion_model."):]: v.clone().float() for k, v in unet_base.items()
              if k.startswith("diffusion_model.")}
    params = merged(params, training.adapters["unet"], lambda p: keys[p][len("diffusion_model."):])
    with torch.inference_mode():
        unet = copy.deepcopy(model.model.diffusion_model)
    handles = [m.register_forward_pre_hook(lambda _m, a, k, c=c: (a, dict(k, context=c, value=c)), with_kwargs=True)
               for m, c in zip(reference.cross_attention_modules(unet), contexts)]
    # the host's blocks add into x in place after a norm kept x for backward: norms read a copy
    handles += [m.register_forward_pre_hook(lambda _m, a: (a[0].clone(), *a[1:]))
                for m in unet.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        eps = torch.func.functional_call(unet, params, (seen["x"], seen["timesteps"]),
                                         {"context": contexts[0], "y": y})
    finally:
        for handle in handles:
            handle.remove()
    mask = seen["mask"]
    return (((eps - seen["target"]) ** 2 * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))).mean()


def test_one_step_loss_and_gradients_match_a_plain_torch_reference(host_models, dataset, monkeypatch):
    model, clip, vae = host_models
    samples = load_dataset(dataset[0], "<TOK>", 64, dataset[1])
    settings = config(crop_p=0.0, attn_reg_weight=0.0)
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(clip, WORDS, ("<rand-0.013>", "man"), 0, "block")  # the node test trains "transformer"
        with host_training(model, clip, vae, samples, settings, tables, 4, False, "block") as training:
            adapters = [a for part in ("text", "text_2", "unet") for a in training.adapters[part].values()]
            with torch.no_grad():
                generator = torch.Generator().manual_seed(1)
                for adapter in adapters:  # zero ups would leave the downs without gradient
                    adapter.up.copy_(torch.randn(adapter.up.shape, generator=generator) * 0.01)
            # SDXL reads clip_l's penultimate layer: its last layer's LoRA cannot matter (clip_g's feeds the pooled output)
            unread = {id(p) for name, a in training.adapters["text"].items() if name.startswith(LAST_CLIP_L_LAYER)
                      for p in (a.down, a.up)}
            params = list(training.embeddings.values()) + [p for a in adapters for p in (a.down, a.up)]
            recorder = Recorder(training, monkeypatch)
            loss = training.loss(0)
            loss.backward()
            assert {id(p) for p in params if p.grad is None} == unread and len(unread) == 8
            params = [p for p in params if id(p) not in unread]
            grads = [p.grad.clone() for p in params]
            for p in params:
                p.grad = None
            expected = reference_loss(model, clip, training, recorder.seen)
            expected.backward()
            expected_grads = [p.grad.clone() for p in params]
    assert recorder.seen["sizes"].tolist() == [[96, 64, 0, 0, 64, 64]]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(g.abs().sum() > 0 for g in expected_grads[:2])  # both concept words learn
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item() + 1e-12)


def test_crop_coordinates_are_the_crops_top_left_corner(host_models, tmp_path):
    """A landscape image whose pixels are 100 + their column index: the canvas shows which column
    the crop starts at, and the size conditioning's crop left must be that column."""
    model, clip, vae = host_models
    (tmp_path / "images").mkdir()
    columns = np.tile(100 + np.arange(96, dtype=np.uint8), (64, 1))
    Image.fromarray(np.stack([columns] * 3, -1)).save(tmp_path / "images" / "0.png")
    (tmp_path / "images" / "0.txt").write_text("<TOK>")
    samples = load_dataset(str(tmp_path / "images"), "<TOK>", 64)
    with torch.inference_mode(False), torch.enable_grad():
        tables = initial_tables(clip, WORDS, ("<rand-0.013>", "man"), 0)
        with host_training(model, clip, vae, samples, config(crop_p=1.0, total_steps=8), tables, 4, False) as training:
            batches = [training.batch(step) for step in range(8)]
    lefts = set()
    for images, _, _, _, sizes in batches:
        row = images[0, 0, 32] * 255
        first = row[row > 0][0].item()  # the canvas is black left of the pasted crop
        left = sizes[0, 3].item()
        assert sizes[0].tolist() == [64, 96, 0, left, 64, 64]
        assert abs(first - 100 - left) < 1.5, (first, left)
        lefts.add(left)
    assert len(lefts) > 1


def test_node_writes_an_sdxl_edlora_the_loader_and_a_stock_ksampler_use(trained, host_models, places):
    model, clip, _ = host_models
    name, curve, previews = trained["result"]
    edlora = load_edlora(str(places / "edlora" / name))
    assert (edlora.family, edlora.granularity) == ("sdxl", "transformer")
    assert all(table.shape == (11, 2048) for table in edlora.embeddings.values())
    assert edlora.words == list(WORDS) and len(edlora.unet) == 560
    assert len(edlora.text_encoder) == 12 and len(edlora.text_encoder_2) == 12
    assert previews.shape == (6, 64, 64, 3) and torch.isfinite(previews).all()
    with torch.inference_mode():
        patched_model, patched_clip = EDLoRALoader().load(model, clip, name, 1.0, 1.0)
        positive = encode_layerwise(patched_clip, "a photo of <t1> <t2> on a beach")
        negative = encode_layerwise(patched_clip, "")
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        (images,) = comfy_nodes.KSampler().sample(patched_model, 5, 2, 7.0, "euler", "normal", positive, negative,
                                                  latent)
        plain = encode_layerwise(patched_clip, "a photo of a man on a beach")
        other = comfy_nodes.KSampler().sample(patched_model, 5, 2, 7.0, "euler", "normal", plain, negative, latent)[0]
    assert positive[0][1]["model_conds"][CONTEXT_KEY].cond.shape == (1, 70, 77, 2048)
    assert torch.isfinite(images["samples"]).all()
    assert (images["samples"] - other["samples"]).abs().max() > 1e-4  # the concept's embeddings act


def test_interrupt_saves_the_step_and_resume_gives_the_uninterrupted_file(trained, host_models, dataset, places):
    model, clip, vae = host_models
    inputs = sdxl_inputs(*dataset, output_name="sdxl_resumed", save_every=0, preview_every=0)
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(server_progress_hook(interrupt_at=1))
    try:
        with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
            EDLoRATrain().train(model, clip, vae, **inputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    states = sorted(p.name for p in (places / "output" / "edlora_training" / "sdxl_resumed").iterdir())
    assert states == ["state-000001.safetensors"]
    with torch.inference_mode():
        EDLoRATrain().train(model, clip, vae, **{**inputs, "resume": "latest"})
    resumed = load_file(str(places / "edlora" / "sdxl_resumed.safetensors"))
    uninterrupted = load_file(str(places / "edlora" / "sdxl_concept.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_original_pth_layout_is_refused_for_sdxl_before_any_step(host_models, dataset, monkeypatch):
    model, clip, vae = host_models
    monkeypatch.setattr(loop.EDLoRATraining, "train_step", lambda self: pytest.fail("a training step ran"))
    with torch.inference_mode(), pytest.raises(ValueError, match="also_save_pth: .* SD1.5 only"):
        EDLoRATrain().train(model, clip, vae, **sdxl_inputs(*dataset, also_save_pth=True))


def test_sdxl_train_ui_workflow_sends_its_api_workflow_on_a_real_server(tmp_path):
    """The SDXL workflows' settings (1024 px, batch 1, checkpointing, bf16, transformer rows) as the
    server's /object_info types them, the UI file sending exactly the API file."""
    ui, api = workflow_pair("sdxl_edlora_train")
    train = api[workflows.only_node(api, "MixOfShowEDLoRATrain")]["inputs"]
    assert (train["resolution"], train["batch_size"], train["gradient_checkpointing"], train["precision"],
            train["granularity"]) == (1024, 1, True, "bf16 autocast", "transformer")
    with running(prepared_server(tmp_path, [])) as client:
        assert_ui_matches_api(ui, api, client.object_info())
