"""Export ED-LoRA: the kohya LoRA stock LoraLoader applies exactly, the textual-inversion files the stock
embedding path reads, the fitted vector against a plain-torch objective, and clear errors."""
import copy
import json

import comfy.model_management
import comfy.utils
import folder_paths
import nodes as comfy_nodes
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_mixofshow.harness import demo_models
from comfyui_mixofshow.harness import server as harness_server
from comfyui_mixofshow.harness.edlora_fixtures import model_lora_shapes, random_edlora
from comfyui_mixofshow.mixofshow_core import sd15
from comfyui_mixofshow.mixofshow_core.edlora_format import EDLoRAFormatError, save_edlora, save_edlora_original
from comfyui_mixofshow.mixofshow_core.kohya_export import mean_rows
from comfyui_mixofshow.nodes.edlora_loader import apply_edlora
from comfyui_mixofshow.nodes.export_edlora import ExportEDLoRA, fitted_vectors
from comfyui_mixofshow.nodes.model_keys import ModelMismatchError, clip_weight_keys, unet_weight_keys

from . import reference
from .interrupts import server_progress_hook
from .node_specs import combo_options
from .server_runs import checked_pixels, prepared_server, run_image, running

CONV = f"{sd15.CROSS_ATTN_BLOCKS[3]}.proj_in"
PROMPTS = (["photo of a", "<x1>", "<x2>"], ["<x1>", "<x2>"])  # the fit's prompts, as text pieces


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """models/edlora, loras and embeddings redirected to tmp_path (each the first and only folder)."""
    for name in ("edlora", "loras", "embeddings"):
        (tmp_path / name).mkdir()
        extensions = folder_paths.folder_names_and_paths[name][1]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], extensions))
    return tmp_path


@pytest.fixture
def concept(model, clip, folders):
    unet_shapes, text_shapes = model_lora_shapes(model, clip)
    edlora = random_edlora(["<x1>", "<x2>"], unet_shapes, text_shapes, seed=5, embedding_scale=0.3,
                           text_lora_scale=0.05, conv_layers=[CONV], name="x.safetensors")
    save_edlora(edlora, str(folders / "edlora" / "x.safetensors"))
    return edlora


def export(name="x.safetensors", output_name="x_export", lora_dtype="same as file", embedding="mean of layer rows",
           overwrite=False, **optional):
    return ExportEDLoRA().export(name, output_name, lora_dtype, embedding, overwrite, **optional)


def loaded_weights(patcher):
    comfy.model_management.load_models_gpu([patcher])
    return {k: v.clone() for k, v in patcher.model.state_dict().items()}


def stock_lora(model, clip, name, strength_model, strength_clip):
    return comfy_nodes.LoraLoader().load_lora(model, clip, name, strength_model, strength_clip)


def test_stock_lora_loader_applies_exactly_the_edlora_lora(folders, model, clip, concept):
    unet_base, clip_base = reference.base_state(model.model), reference.base_state(clip.cond_stage_model)
    out = export()
    assert out["ui"]["text"][0] == "loras/x_export.safetensors"
    stock_model, stock_clip = stock_lora(model, clip, "x_export.safetensors", 0.8, 0.3)
    stock_unet, stock_text = loaded_weights(stock_model), loaded_weights(stock_clip.patcher)
    ours_model, ours_clip = apply_edlora(model, clip, concept, 0.8, 0.3)
    ours_unet, ours_text = loaded_weights(ours_model), loaded_weights(ours_clip.patcher)
    assert all(torch.equal(stock_unet[k], ours_unet[k]) for k in unet_base)
    assert all(torch.equal(stock_text[k], ours_text[k]) for k in clip_base)
    unet_keys = unet_weight_keys(model)
    for path, layer in concept.unet.items():  # plain torch in float32, the model's dtype: bit for bit
        key = unet_keys[path]
        delta = (layer.up.flatten(1) @ layer.down.flatten(1)).reshape(unet_base[key].shape)
        assert torch.equal(stock_unet[key], unet_base[key] + 0.8 * delta), path
    for path, layer in concept.text_encoder.items():  # the host keeps CPU text encoders in fp16
        key = clip_weight_keys(clip)[path]
        expected = clip_base[key].double() + 0.3 * layer.up.double() @ layer.down.double()
        assert torch.allclose(stock_text[key].double(), expected, rtol=2 ** -10, atol=1e-6), path
    changed = [k for k in unet_base if not torch.equal(unet_base[k], stock_unet[k])]
    assert len(changed) == len(concept.unet) == 16 * 8 + 1
    assert sum(not torch.equal(clip_base[k], stock_text[k]) for k in clip_base) == len(concept.text_encoder)


def test_lora_file_dtype_and_kohya_metadata(folders, model, clip, concept):
    export(lora_dtype="float16")
    path = str(folders / "loras" / "x_export.safetensors")
    tensors = load_file(path)
    key = "lora_unet_" + CONV.replace(".", "_")
    assert tensors[key + ".lora_down.weight"].dtype == torch.float16
    assert torch.equal(tensors[key + ".lora_down.weight"], concept.unet[CONV].down.half())
    assert float(tensors[key + ".alpha"]) == 4.0
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["mixofshow.exported_from"] == "x.safetensors"
    assert json.loads(meta["mixofshow.embeddings"]) == {"<x1>": "x_export_x1", "<x2>": "x_export_x2"}
    unet_base = reference.base_state(model.model)
    stock = loaded_weights(stock_lora(model, clip, "x_export.safetensors", 1.0, 1.0)[0])
    conv_key = unet_weight_keys(model)[CONV]
    layer = concept.unet[CONV]
    delta = (layer.up.half().float().flatten(1) @ layer.down.half().float().flatten(1)).reshape(unet_base[conv_key].shape)
    assert torch.equal(stock[conv_key], unet_base[conv_key] + delta)


def clip_with_embeddings(clip, folder):
    """A clone whose tokenizer reads `folder` (CheckpointLoaderSimple passes models/embeddings)."""
    patched = clip.clone()
    patched.tokenizer = copy.copy(clip.tokenizer)
    patched.tokenizer.clip_l = copy.copy(clip.tokenizer.clip_l)
    patched.tokenizer.clip_l.embedding_directory = [str(folder)]
    return patched


def reference_encoding(state, pieces, layer=0):
    return reference.clip_last_hidden_state(state, reference.input_embeddings(state, reference.hf_tokenizer(),
                                                                              pieces, layer))


def test_embeddings_load_through_the_stock_embedding_syntax(folders, model, clip, concept):
    lines = export(embedding="fitted", clip=clip, fit_steps=5)["ui"]["text"]
    assert lines[1:3] == ["embeddings/x_export_x1.safetensors", "embeddings/x_export_x2.safetensors"]
    vectors = {w: load_file(str(folders / "embeddings" / f"x_export_{w[1:-1]}.safetensors"))["emb_params"]
               for w in ("<x1>", "<x2>")}
    assert all(v.shape == (1, 768) and v.dtype == torch.float32 for v in vectors.values())
    stock_clip = clip_with_embeddings(stock_lora(model, clip, "x_export.safetensors", 0.0, 1.0)[1],
                                      folders / "embeddings")
    text = "photo of a embedding:x_export_x1 embedding:x_export_x2"
    spliced = [t for t, *_ in stock_clip.tokenize(text)["l"][0] if isinstance(t, torch.Tensor)]
    assert len(spliced) == 2
    assert torch.equal(spliced[0], vectors["<x1>"][0]) and torch.equal(spliced[1], vectors["<x2>"][0])
    (cond, _), = comfy_nodes.CLIPTextEncode().encode(stock_clip, text)[0]
    state = reference.merged_state(reference.base_state(clip.cond_stage_model), concept.text_encoder,
                                   clip_weight_keys(clip), 1.0)
    expected = reference_encoding(state, ["photo of a", vectors["<x1>"], vectors["<x2>"]])
    assert torch.allclose(cond.float(), expected, atol=2e-3, rtol=1e-3)


def test_node_output_is_the_prompt_text_for_the_embeddings(folders, concept):
    out = export(output_name="pot")
    assert out["result"] == ("embedding:pot_x1 embedding:pot_x2",)
    assert out["ui"]["text"][-1] == "embeddings: mean of the 16 layer rows"
    written = load_file(str(folders / "embeddings" / "pot_x2.safetensors"))["emb_params"][0]
    assert torch.allclose(written, concept.embeddings["<x2>"].mean(dim=0), atol=1e-7)


def layer_objective_reference(clip, concept, vectors):
    """J = mean_l mean (E(v) - E_l)^2 over the fit's prompts, with the plain-torch CLIP."""
    state = reference.merged_state(reference.base_state(clip.cond_stage_model), concept.text_encoder,
                                   clip_weight_keys(clip), 1.0)
    total = 0.0
    for pieces in PROMPTS:
        single = reference_encoding(state, [vectors[p][None] if p.startswith("<") else p for p in pieces])
        for layer in range(16):
            per_layer = reference_encoding(state, [concept.embeddings[p] if p.startswith("<") else p for p in pieces],
                                           layer)
            total += float((single.double() - per_layer.double()).square().mean())
    return total / (16 * len(PROMPTS))


def test_fitted_vectors_beat_the_mean_on_the_plain_torch_objective(clip, concept):
    fit = fitted_vectors(clip, concept, 1.0, 20)
    assert fit.fitted
    fitted = dict(zip(concept.words, fit.vectors))
    mean = {w: mean_rows(t) for w, t in concept.embeddings.items()}
    j_fit, j_mean = layer_objective_reference(clip, concept, fitted), layer_objective_reference(clip, concept, mean)
    assert fit.objective == pytest.approx(j_fit, rel=1e-3)
    assert fit.initial_objective == pytest.approx(j_mean, rel=1e-3)
    assert fit.floor < j_fit < j_mean


def test_fit_reports_progress_and_honours_interrupt(folders, clip, concept):
    previous, calls = comfy.utils.PROGRESS_BAR_HOOK, []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: calls.append((value, total)))
    try:
        export(embedding="fitted", clip=clip, fit_steps=4)
        assert calls and calls[-1][1] == 5 and [v for v, _ in calls] == list(range(1, len(calls) + 1))
        comfy.utils.set_progress_bar_global_hook(server_progress_hook(interrupt_at=2))
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            export(output_name="stopped", embedding="fitted", clip=clip, fit_steps=4)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert not (folders / "loras" / "stopped.safetensors").exists()
    assert sorted(p.name for p in (folders / "embeddings").iterdir()) == ["x_export_x1.safetensors",
                                                                        "x_export_x2.safetensors"]


def test_fit_sets_the_training_flag_of_hosts_that_have_one(folders, clip, concept, monkeypatch):
    """ComfyUI 0.38 switches its ops to differentiable kernels while `in_training` is set."""
    monkeypatch.setattr(comfy.model_management, "in_training", False, raising=False)
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda *a, **k: seen.append(comfy.model_management.in_training))
    export(embedding="fitted", clip=clip, fit_steps=2)
    assert seen and all(seen)
    assert comfy.model_management.in_training is False


def test_existing_files_are_kept_unless_overwrite(folders, concept):
    export()
    lora = folders / "loras" / "x_export.safetensors"
    before = lora.read_bytes()
    with pytest.raises(FileExistsError, match=r"output_name: loras/x_export.safetensors(, embeddings/\S+)* "
                                              r"already exists; choose another output_name or turn on overwrite"):
        export(lora_dtype="float16")
    assert lora.read_bytes() == before
    export(lora_dtype="float16", overwrite=True)
    assert lora.read_bytes() != before
    (folders / "embeddings" / "y_x1.safetensors").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="embeddings/y_x1.safetensors already exists"):
        export(output_name="y")
    assert not (folders / "loras" / "y.safetensors").exists()


@pytest.mark.parametrize("output_name, message", [
    ("../escape", "output_name '../escape': use letters"),
    ("sub/x", "output_name 'sub/x': use letters"),
    ("two words", "output_name 'two words': no spaces"),
    ("", "output_name '': use letters"),
])
def test_output_names_that_escape_or_break_prompts_are_refused(folders, concept, output_name, message):
    with pytest.raises(ValueError, match=message):
        export(output_name=output_name)
    assert ExportEDLoRA.VALIDATE_INPUTS(output_name=output_name) is not True or " " in output_name
    assert list((folders / "loras").iterdir()) == []


def test_missing_malformed_and_unfit_inputs_give_one_clear_error(folders, clip, concept):
    with pytest.raises(FileNotFoundError, match="edlora_name: gone.pth is not in models/edlora"):
        export("gone.pth")
    (folders / "edlora" / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EDLoRAFormatError, match="junk.safetensors: not a readable .safetensors file"):
        export("junk.safetensors")
    with pytest.raises(ValueError, match="clip: connect the base SD1.5 CLIP to fit the embeddings"):
        export(embedding="fitted")
    with pytest.raises(ValueError, match="lora_dtype 'float8': choose one of"):
        export(lora_dtype="float8")
    with pytest.raises(ValueError, match="embedding 'median': choose one of fitted, mean of layer rows"):
        export(embedding="median")
    export(output_name="plain")  # a kohya LoRA (ours) is not an ED-LoRA
    (folders / "loras" / "plain.safetensors").rename(folders / "edlora" / "plain.safetensors")
    with pytest.raises(EDLoRAFormatError, match="plain.safetensors: not a Mix-of-Show ED-LoRA"):
        export("plain.safetensors")
    deep = random_edlora(["<d1>"], {}, {"text_model.encoder.layers.11.self_attn.q_proj": (768, 768)}, name="deep")
    save_edlora(deep, str(folders / "edlora" / "deep.safetensors"))
    with pytest.raises(ModelMismatchError, match="deep.safetensors: text_encoder layer text_model.encoder.layers.11"
                                                 ".self_attn.q_proj does not exist in this model"):
        export("deep.safetensors", output_name="deep", embedding="fitted", clip=clip)
    skipped = clip.clone()
    skipped.clip_layer(-2)
    with pytest.raises(ValueError, match="clip: CLIP skip is set"):
        export(embedding="fitted", clip=skipped)
    assert not (folders / "loras" / "deep.safetensors").exists()


def test_original_pth_exports_the_same_lora(folders, concept):
    save_edlora_original(concept, str(folders / "edlora" / "x.pth"))
    export("x.pth", output_name="from_pth")
    export(output_name="from_st")
    from_pth = load_file(str(folders / "loras" / "from_pth.safetensors"))
    from_st = load_file(str(folders / "loras" / "from_st.safetensors"))
    assert from_pth.keys() == from_st.keys() and all(torch.equal(from_pth[k], from_st[k]) for k in from_st)


def test_is_changed_follows_the_source_and_the_written_lora(folders, concept):
    export()
    before = ExportEDLoRA.IS_CHANGED("x.safetensors", output_name="x_export")
    assert before == ExportEDLoRA.IS_CHANGED("x.safetensors", output_name="x_export")
    (folders / "loras" / "x_export.safetensors").unlink()
    after = ExportEDLoRA.IS_CHANGED("x.safetensors", output_name="x_export")
    assert after != after  # NaN: the node runs again and rewrites what was deleted


# ---- through a real server --------------------------------------------------------------------

SERVER_NAME = "mixofshow_test_export"


@pytest.fixture(scope="module")
def server_run(tmp_path_factory):
    """(server, client): a server with the demo checkpoint and ED-LoRA. The node writes into ComfyUI's
    first loras/embeddings folders, the host's own models/ folders: the fixture removes its files."""
    checkpoint, edlora = demo_models.ensure_demo_models()
    server = prepared_server(tmp_path_factory.mktemp("comfy-export"), [("checkpoints", checkpoint),
                                                                        ("edlora", edlora)])
    try:
        with running(server) as client:
            yield server, client
    finally:
        for kind in ("loras", "embeddings"):
            for path in (demo_models.host_models_dir(server) / kind).glob(f"{SERVER_NAME}*.safetensors"):
                path.unlink()


def export_graph(**inputs):
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo_models.DEMO_CHECKPOINT}},
            "2": {"class_type": "MixOfShowExportEDLoRA", "inputs": {
                "edlora_name": demo_models.DEMO_EDLORA, "output_name": SERVER_NAME, "lora_dtype": "same as file",
                "embedding": "fitted", "overwrite": False, "clip": ["1", 1], "text_encoder_alpha": 1.0,
                "fit_steps": 3, **inputs}}}


def stock_graph(text, lora):
    """Stock nodes only: Load LoRA + CLIPTextEncode with embeddings, sampled and saved."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": demo_models.DEMO_CHECKPOINT}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": text}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "KSampler", "inputs": {
                "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 1,
                "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": SERVER_NAME}}}


def test_server_exports_and_stock_nodes_use_the_files(server_run):
    server, client = server_run
    entry = client.run(export_graph(), timeout=300)
    shown = entry["outputs"]["2"]["text"]
    lora = f"{SERVER_NAME}.safetensors"
    assert shown[:3] == [f"loras/{lora}", f"embeddings/{SERVER_NAME}_cat1.safetensors",
                         f"embeddings/{SERVER_NAME}_cat2.safetensors"]
    assert shown[3].startswith("embeddings: fitted vectors; layer-encoding error")
    models = demo_models.host_models_dir(server)
    assert (models / "loras" / lora).is_file()
    assert lora in combo_options(client.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"])
    log_before = server.log_path.read_text()
    text = f"photo of a embedding:{SERVER_NAME}_cat1 embedding:{SERVER_NAME}_cat2"
    checked_pixels(run_image(client, stock_graph(text, lora))[1], (64, 64))
    new_log = server.log_path.read_text()[len(log_before):]
    assert "lora key not loaded" not in new_log and "does not exist, ignoring" not in new_log, new_log

    with pytest.raises(harness_server.ComfyError, match="already exists; choose another output_name"):
        client.run(export_graph(fit_steps=4), timeout=300)
    client.run(export_graph(fit_steps=4, overwrite=True, embedding="mean of layer rows"), timeout=300)
    assert client.system_stats()["system"]
