"""Hostile and careless input through a real, headless ComfyUI server (issue 11, items 2, 4, 5).

Every case asserts one clear error naming the input or file, that the server still serves, and
that nothing outside the folders a case may write changed. Cases that need no training run first,
so the server's peak RSS (VmHWM) shows whether a bomb image or a huge box string cost memory.
"""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from comfyui_mixofshow.harness import demo_data, demo_models, workflows
from comfyui_mixofshow.harness.hostile_files import decompression_bomb_png
from comfyui_mixofshow.harness.server import ComfyError
from comfyui_mixofshow.mixofshow_core.edlora_format import load_edlora
from comfyui_mixofshow.mixofshow_core.messages import excerpt
from comfyui_mixofshow.mixofshow_core.safe_io import read_safetensors

from .node_specs import combo_options
from .server_runs import prepared_server, running

WORDS = ("<cat1>", "<cat2>")
SECRET = "TOP SECRET caption line"
ALPHA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
LEFTOVERS = {"checkpoints": [".tmp-abcd1234.safetensors", ".tmpAb12Cd", ".x.safetensors.partial-abcd_123"],
             "edlora": [".tmp-wxyz9876.safetensors", ".c.safetensors.partial-zz99zz99"]}
MIB = 1 << 20


def snapshot(folder):
    """{relative path: (size, mtime)} of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            stat = os.lstat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_size, stat.st_mtime_ns)
    return out


def write_hostile_edloras(folder, good):
    """{file name: text the error must contain}: ED-LoRAs with bad numbers."""
    tensors, metadata = read_safetensors(str(good))
    down, up = ALPHA_KEY.replace(".alpha", ".lora_down.weight"), ALPHA_KEY.replace(".alpha", ".lora_up.weight")
    cases = {}
    for name, changes, message in (
            ("alpha_nan.safetensors", {ALPHA_KEY: torch.tensor(float("nan"))}, ".alpha nan"),
            ("alpha_huge.safetensors", {ALPHA_KEY: torch.tensor(1e30)}, ".alpha 1e+30"),
            ("alpha_vector.safetensors", {ALPHA_KEY: torch.ones(3)}, ".alpha must be one number"),
            ("rank_zero.safetensors", {down: torch.zeros(0, tensors[down].shape[1]),
                                       up: torch.zeros(tensors[up].shape[0], 0)}, "rank 0")):
        save_file({**tensors, **changes}, str(folder / name), metadata=metadata)
        cases[name] = message
    return cases


def write_hostile_fused(folder):
    """{file name: text the error must contain}: fused checkpoints with bad metadata or embeddings."""
    table = torch.zeros(16, 768)
    cases = {}
    for name, metadata, tensors, message in (
            ("fused_json.safetensors", "[{", {"mixofshow.embedding.<a1>": table}, "must be a JSON list"),
            ("fused_nokey.safetensors", json.dumps([{"source": "x"}]), {"mixofshow.embedding.<a1>": table},
             "must be a JSON list"),
            ("fused_shape.safetensors", json.dumps([{"word": "<a1>"}]),
             {"mixofshow.embedding.<a1>": torch.zeros(4, 768)}, "embedding of <a1> is [4, 768], expected [16, 768]"),
            ("fused_nan.safetensors", json.dumps([{"word": "<a1>"}]),
             {"mixofshow.embedding.<a1>": torch.full((16, 768), float("nan"))}, "finite"),
            ("fused_bare.safetensors", json.dumps([{"word": "a1"}]), {"mixofshow.embedding.a1": table},
             "must look like <name>")):
        save_file(tensors, str(folder / name), metadata={"mixofshow.concepts": metadata})
        cases[name] = message
    data = (folder / "fused_json.safetensors").read_bytes()
    (folder / "fused_cut.safetensors").write_bytes(data[:40])
    cases["fused_cut.safetensors"] = "not a readable .safetensors file"
    return cases


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    checkpoint, edlora = demo_models.ensure_demo_models()
    server = prepared_server(tmp_path_factory.mktemp("comfy-hostile"),
                             [("checkpoints", checkpoint), ("edlora", edlora)])
    demo_data.write_concept_dataset(server.run_dir / "input" / "cat", "cat", count=1, size=64)
    outside = tmp_path_factory.mktemp("outside")
    demo_data.write_concept_dataset(outside, "dog", count=1, size=64)
    (outside / "00.txt").write_text(SECRET + "\nsecond line\n")
    (outside / "state-000001.safetensors").write_bytes(b"not a state")
    (server.run_dir / "input" / "escape").symlink_to(outside, target_is_directory=True)
    bomb = server.run_dir / "input" / "bomb"
    (bomb / "masks").mkdir(parents=True)
    decompression_bomb_png(bomb / "00.png")
    edlora_cases = write_hostile_edloras(server.models_dir("edlora"), edlora)
    fused_cases = write_hostile_fused(server.models_dir("checkpoints"))
    old = os.path.getmtime(checkpoint) - 3600
    for folder, names in LEFTOVERS.items():
        for name in names:
            (server.models_dir(folder) / name).write_bytes(b"")
            os.utime(server.models_dir(folder) / name, (old, old))
    before = snapshot(outside)
    with running(server):
        client = server.client(timeout=600)  # a training prompt on a loaded machine can stall one poll
        yield {"server": server, "client": client, "outside": outside, "edlora_cases": edlora_cases,
               "fused_cases": fused_cases, "checkpoint": checkpoint.name}
        assert client.system_stats()["system"]  # still serving after every case
    assert snapshot(outside) == before  # nothing outside ComfyUI's folders was touched


def peak_rss(server):
    with open(f"/proc/{server.process.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def failure(client, graph, timeout=600):
    """The one execution error of a prompt that must fail: (node type, exception message)."""
    with pytest.raises(ComfyError) as error:
        client.run(graph, timeout)
    messages = [data for event, data in error.value.details["status"]["messages"] if event == "execution_error"]
    assert len(messages) == 1, error.value
    return messages[0]["node_type"], messages[0]["exception_message"].strip()  # current ComfyUI adds a "\n"


def rejection(client, graph):
    """The validation error text of a prompt the server must refuse before running anything."""
    with pytest.raises(ComfyError) as error:
        client.queue(graph)
    return str(error.value)


def train_graph(checkpoint, dataset="cat", name="hostile_cat", **inputs):
    graph = workflows.build_train_prompt(
        workflows.load_workflow(workflows.TRAIN_WORKFLOW), checkpoint, dataset, WORDS, ("<rand-0.013>", "cat"),
        name, f"{dataset}/masks", steps=1, batch_size=1, resolution=64, caption_template="object", preview_steps=1)
    graph[workflows.only_node(graph, "MixOfShowEDLoRATrain")]["inputs"].update(inputs)
    return graph


def sampling_graph(loader, **region):
    """loader node -> text encode -> (regions) -> 1 KSampler step at 64 px -> PreviewImage."""
    model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    graph = {"1": loader,
             "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a photo"}},
             "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "4": {"class_type": "KSampler", "inputs": {
                 "model": model, "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 1,
                 "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
             "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": vae}},
             "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}
    if region:
        graph["7"] = {"class_type": "MixOfShowRegionPrompt", "inputs": {
            "clip": clip, "prompt": "a cat", "negative_prompt": "", "units": "normalized", "width": 64,
            "height": 64, "adapter_weight": 1.0, **region}}
        graph["8"] = {"class_type": "MixOfShowApplyRegions", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["2", 0], "regions": ["7", 0]}}
        graph["4"]["inputs"].update(model=["8", 0], positive=["8", 1], negative=["8", 2])
    return graph


# -- item 2: paths -----------------------------------------------------------------------------
def test_dataset_and_masks_folders_outside_the_input_folder_are_refused_alike(run):
    client, outside = run["client"], run["outside"]
    for input_name, values in (("dataset_folder", [str(outside), str(outside / "nowhere"), "../../..", "escape",
                                                   "cat/../../" + outside.name, "/root", "/"]),
                               ("masks_folder", [str(outside), "escape", "/etc", "../input/../.."])):
        for value in values:
            node, message = failure(client, train_graph(run["checkpoint"], **{input_name: value}))
            assert node == "MixOfShowEDLoRATrain"
            assert message == (f"{input_name} {value!r}: must be a path inside ComfyUI's input folder "
                               f"(relative, without '..' or links leading out of it)"), message
            assert SECRET not in message and "00.png" not in message
    assert not list(run["server"].models_dir("edlora").glob("hostile_cat*"))  # nothing trained


def test_resume_outside_the_training_state_folder_is_refused_alike(run):
    client, outside = run["client"], run["outside"]
    messages = set()
    for value in (str(outside / "state-000001.safetensors"), str(outside / "missing.safetensors"),
                  "../../../../" + str(outside / "state-000001.safetensors")):
        node, message = failure(client, train_graph(run["checkpoint"], resume=value))
        assert node == "MixOfShowEDLoRATrain" and message.startswith(f"resume {excerpt(value)}: must be a path "
                                                                     f"inside output/edlora_training"), message
        messages.add(message.replace(excerpt(value), "VALUE"))
    assert len(messages) == 1  # no existence probe


def test_caption_contents_are_never_echoed(run):
    input_dir = run["server"].run_dir / "input" / "captions"
    demo_data.write_concept_dataset(input_dir, "cat", count=1, size=64)
    (input_dir / "00.txt").write_text(SECRET + "\n")
    node, message = failure(run["client"], train_graph(run["checkpoint"], dataset="captions"))
    assert "00.txt" in message and "does not contain the placeholder" in message and SECRET not in message


# -- item 4: numbers from files ----------------------------------------------------------------
def test_edlora_with_bad_alpha_or_rank_is_refused_naming_the_file(run):
    client = run["client"]
    for name, expected in run["edlora_cases"].items():
        graph = workflows.build_prompt(workflows.load_workflow(), run["checkpoint"], [name])
        node, message = failure(client, graph)
        assert node == "MixOfShowEDLoRALoader" and message.startswith(name + ": ") and expected in message, message


def test_fused_checkpoint_with_bad_metadata_or_embeddings_is_refused_naming_the_file(run):
    client = run["client"]
    for name, expected in run["fused_cases"].items():
        graph = sampling_graph({"class_type": "MixOfShowLoadFusedModel", "inputs": {"ckpt_name": name}})
        node, message = failure(client, graph)
        assert node == "MixOfShowLoadFusedModel" and message.startswith(name + ": ") and expected in message, message


# -- item 5: names and files -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "a" * 300, "cat\n", "cat ", "../../escape", ".hidden"])
def test_bad_output_names_are_refused_before_anything_runs(run, name):
    text = rejection(run["client"], train_graph(run["checkpoint"], name=name))
    assert "output_name" in text and ("use letters" in text or "longer than 100 bytes" in text), text
    assert len(text) < 2000


@pytest.mark.parametrize("prefix", ["..", "../outside", "fused\n", "a" * 300, "fused/../x"])
def test_bad_fused_model_prefixes_are_refused_before_anything_runs(run, prefix):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": run["checkpoint"]}},
             "2": {"class_type": "MixOfShowSaveFusedModel", "inputs": {
                 "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": prefix}}}
    text = rejection(run["client"], graph)
    assert "filename_prefix" in text and ("use letters" in text or "longer than 100 bytes" in text), text


def test_temp_files_of_killed_saves_are_cleaned_at_start_and_never_listed(run):
    server, client = run["server"], run["client"]
    info = client.object_info()
    listed = (combo_options(info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"])
              + combo_options(info["MixOfShowEDLoRALoader"]["input"]["required"]["edlora_name"]))
    assert run["checkpoint"] in listed
    for folder, names in LEFTOVERS.items():
        for name in names:
            assert not (server.models_dir(folder) / name).exists() and name not in listed


def test_decompression_bomb_image_is_refused_naming_the_file_without_decoding(run):
    server, client = run["server"], run["client"]
    peak = peak_rss(server)
    node, message = failure(client, train_graph(run["checkpoint"], dataset="bomb"))
    assert node == "MixOfShowEDLoRATrain" and "00.png: refused, more than" in message, message
    assert peak_rss(server) - peak < 300 * MIB  # 900 megapixels were never decoded


def test_huge_box_string_is_not_echoed_whole(run):
    server, client = run["server"], run["client"]
    box = "0.1, " * 40000  # 200 KB
    peak = peak_rss(server)
    node, message = failure(client, sampling_graph(
        {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": run["checkpoint"]}}, box=box))
    assert node == "MixOfShowRegionPrompt" and message.startswith("box: ") and len(message) < 500, message[:1000]
    assert peak_rss(server) - peak < 1024 * MIB


def test_also_save_pth_refuses_to_replace_a_users_file(run):
    server, client = run["server"], run["client"]
    users = server.models_dir("edlora") / "hostile_pth.pth"
    torch.save({"mine": torch.ones(2)}, users)
    before = users.read_bytes()
    node, message = failure(client, train_graph(run["checkpoint"], name="hostile_pth", also_save_pth=True))
    assert node == "MixOfShowEDLoRATrain" and message.startswith("also_save_pth: hostile_pth.pth already exists")
    assert users.read_bytes() == before and not (server.models_dir("edlora") / "hostile_pth.safetensors").exists()


def test_training_reruns_when_its_output_was_deleted(run):
    server, client = run["server"], run["client"]
    graph = train_graph(run["checkpoint"], name="hostile_rerun", also_save_pth=True)
    output = server.models_dir("edlora") / "hostile_rerun.safetensors"
    client.run(graph, timeout=900)
    assert load_edlora(str(output)).words == list(WORDS)
    pth = output.with_suffix(".pth")
    assert load_edlora(str(pth)).words == list(WORDS)
    first = output.stat().st_mtime_ns
    client.run(graph, timeout=900)  # unchanged inputs and output: cached, nothing rewritten
    assert output.stat().st_mtime_ns == first
    output.unlink()
    pth.unlink()  # a .pth without its .safetensors is not replaced: nothing vouches that this node wrote it
    client.run(graph, timeout=900)  # the output is gone: trains again and writes it again
    assert load_edlora(str(output)).words == list(WORDS) and load_edlora(str(pth)).words == list(WORDS)
