"""The training workflow (workflows/edlora_train*.json) through a real, headless ComfyUI server,
as scripts/demo.sh queues it: EDLoRA Train on the demo checkpoint with the demo's generated
drawings (captions with <TOK>, masks), one step at 64 px; then the trained file in the
txt2img workflow's EDLoRA Loader; and the interrupt button during training, then resume.
"""
import copy
import time

import pytest
import torch
from safetensors.torch import load_file

from comfyui_mixofshow.harness import demo_data, demo_models, workflows
from comfyui_mixofshow.harness.server import ComfyError, execution_errors
from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora

from .server_runs import assert_ui_matches_api, checked_pixels, prepared_server, run_image, running, workflow_pair

WORDS = ("<cat1>", "<cat2>")
NAME = "mixofshow_test_trained_cat"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(server, client, trained entry, graph): one training prompt on a server in a temporary folder."""
    checkpoint = demo_models.ensure_demo_checkpoint()  # cached in .host/run, shared with the demo
    server = prepared_server(tmp_path_factory.mktemp("comfy-train"), [("checkpoints", checkpoint)])
    images, masks = demo_data.write_concept_dataset(server.run_dir / "input" / "cat", "cat", count=2, size=64)
    graph = workflows.build_train_prompt(
        workflows.load_workflow(workflows.TRAIN_WORKFLOW), checkpoint.name, "cat", WORDS, ("<rand-0.013>", "cat"),
        NAME, "cat/masks", steps=1, batch_size=1, resolution=64, caption_template="object", preview_steps=1)
    with running(server) as client:
        yield server, client, client.run(graph, timeout=900), graph


def test_generated_dataset_is_a_valid_training_set(tmp_path):
    from comfyui_mixofshow.mixofshow_core.training.dataset import load_dataset
    images, masks = demo_data.write_concept_dataset(tmp_path, "dog", count=3, size=64, seed=4)
    samples = load_dataset(str(images), demo_data.PLACEHOLDER, 64, str(masks))
    assert [s.name for s in samples] == ["00.png", "01.png", "02.png"]
    for sample in samples:
        assert sample.caption.startswith("<TOK>, ") and sample.mask.size == sample.image.size
        covered = sum(1 for value in sample.mask.getdata() if value == 255) / (64 * 64)
        assert 0.05 < covered < 0.6  # the drawn animal, not the background


def test_training_prompt_writes_the_edlora_and_reports_it(run):
    server, client, entry, graph = run
    name = workflows.reported_files(entry, graph, "MixOfShowEDLoRATrain")[0]
    assert name == f"{NAME}.safetensors"
    edlora = load_edlora(str(server.models_dir("edlora") / name))  # the first models/edlora folder
    assert edlora.words == list(WORDS) and edlora.rank == 4
    assert len(edlora.unet) == 128 and len(edlora.text_encoder) == 48  # CLIP-L: 12 layers x q/k/v/out
    assert all(table.shape == (16, 768) for table in edlora.embeddings.values())


def test_training_prompt_shows_the_loss_curve_and_previews(run):
    _, client, entry, graph = run
    curve = entry["outputs"][workflows.only_node(graph, "PreviewImage")]["images"]
    previews = client.images(entry, workflows.only_node(graph, "SaveImage"))
    assert len(curve) == 1 and curve[0]["type"] == "temp"
    assert len(previews) == 3  # α 0, 0.7, 1.0 at the end
    for info, png in previews:
        assert info["type"] == "output"
        checked_pixels(png, (64, 64))


def test_trained_edlora_samples_in_the_txt2img_workflow(run):
    server, client, entry, graph = run
    trained = workflows.reported_files(entry, graph, "MixOfShowEDLoRATrain")
    txt2img = workflows.build_prompt(workflows.load_workflow(), demo_models.DEMO_CHECKPOINT, trained, steps=2,
                                     filename_prefix="trained")
    info, png = run_image(client, txt2img)
    assert workflows.positive_text(txt2img).startswith("a photo of <cat1> <cat2>")
    checked_pixels(png, (64, 64))


def test_ui_workflow_sends_the_api_workflow(run):
    _, client, _, _ = run
    assert_ui_matches_api(*workflow_pair("edlora_train"), client.object_info())


def training_graph(graph, output_name, steps, resume=""):
    graph = copy.deepcopy(graph)
    graph[workflows.only_node(graph, "MixOfShowEDLoRATrain")]["inputs"].update(
        output_name=output_name, steps=steps, resume=resume, save_every=0, preview_every=0)
    return graph


def wait_for_log_line(server, text, timeout=600):
    deadline = time.monotonic() + timeout
    while text not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {server.log_path} within {timeout} s"
        time.sleep(0.05)


def test_interrupt_button_saves_a_state_that_resume_latest_completes_bit_for_bit(run):
    """POST /interrupt while step 2 of 4 runs (no periodic saves): the prompt ends as interrupted
    with the last completed step saved; 'resume: latest' finishes it, and its file equals a run
    that was never interrupted."""
    server, client, _, graph = run
    name, steps = "mixofshow_test_interrupted_cat", 4
    prompt_id = client.queue(training_graph(graph, name, steps))
    wait_for_log_line(server, f"EDLoRA Train {name}: step 1/{steps}")
    client.interrupt()
    with pytest.raises(ComfyError) as stopped:
        client.wait(prompt_id, timeout=900)
    assert "interrupted at node" in execution_errors(stopped.value.details)
    states = sorted((server.run_dir / "output" / "edlora_training" / name).glob("state-*.safetensors"))
    assert len(states) == 1 and 1 <= int(states[0].stem[len("state-"):]) < steps, states
    edloras = server.models_dir("edlora")
    assert not (edloras / f"{name}.safetensors").exists()
    client.run(training_graph(graph, name, steps, resume="latest"), timeout=900)
    client.run(training_graph(graph, "mixofshow_test_straight_cat", steps), timeout=900)
    resumed = load_file(str(edloras / f"{name}.safetensors"))
    straight = load_file(str(edloras / "mixofshow_test_straight_cat.safetensors"))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
