"""The checks every path, name and fused-checkpoint input passes (nodes/paths.py, Load Fused Model)."""
import json
import os

import folder_paths
import pytest
import torch
from safetensors.torch import save_file

from comfyui_mixofshow.nodes.fused_model import FusedCheckpointError, read_concepts
from comfyui_mixofshow.nodes.paths import UnsafePathError, WrittenFiles, check_output_name, input_folder, inside


@pytest.fixture
def input_dir(tmp_path, monkeypatch):
    folder = tmp_path / "input"
    (folder / "cats").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (folder / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (folder / "inner").symlink_to(folder / "cats", target_is_directory=True)
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(folder))
    return folder


def test_folders_resolve_inside_the_input_folder(input_dir):
    assert input_folder(" cats ", "dataset_folder") == str(input_dir / "cats")
    assert input_folder("inner", "dataset_folder") == str(input_dir / "cats")  # a link that stays inside
    assert input_folder(str(input_dir / "cats"), "dataset_folder") == str(input_dir / "cats")
    assert input_folder("not_yet_there", "masks_folder") == str(input_dir / "not_yet_there")
    assert input_folder("  ", "masks_folder") == ""


@pytest.mark.parametrize("value", ["/root", "/etc", "/no/such/folder", "..", "../outside", "cats/../../outside",
                                   "escape", "escape/sub", "/"])
def test_folders_outside_are_refused_alike_whether_they_exist_or_not(input_dir, value):
    with pytest.raises(UnsafePathError) as error:
        input_folder(value, "dataset_folder")
    message = str(error.value)
    assert message == (f"dataset_folder {value!r}: must be a path inside ComfyUI's input folder "
                       f"(relative, without '..' or links leading out of it)")
    assert str(input_dir.parent) not in message


def test_resume_paths_stay_in_the_state_root(tmp_path):
    root = tmp_path / "edlora_training"
    (root / "cat").mkdir(parents=True)
    assert inside(str(root), "state-000001.safetensors", "resume", "x", base=str(root / "cat")) == \
        str(root / "cat" / "state-000001.safetensors")
    assert inside(str(root), "../dog/state-000001.safetensors", "resume", "x", base=str(root / "cat")) == \
        str(root / "dog" / "state-000001.safetensors")
    with pytest.raises(UnsafePathError, match="resume '../../x': must be a path inside output/edlora_training"):
        inside(str(root), "../../x", "resume", "output/edlora_training", base=str(root / "cat"))


@pytest.mark.parametrize("value, subfolders", [
    ("my_concept", False), ("cat v2.1-final", False), ("a" * 100, False), ("fused/cats", True), ("ünï", False)])
def test_good_output_names_pass(value, subfolders):
    check_output_name(value, "output_name", subfolders)


@pytest.mark.parametrize("value, subfolders, problem", [
    ("", False, "use letters"), (".", False, "use letters"), ("..", False, "use letters"),
    ("..", True, "use letters"), ("fused/../../x", True, "use letters"), ("cat\n", False, "line breaks"),
    (" cat", False, "spaces"), ("cat ", False, "spaces"), (".hidden", False, "start with '.'"),
    ("a/b", False, "use letters"), ("/abs", True, "use letters"), ("a//b", True, "use letters"),
    ("a" * 101, False, "longer than 100 bytes"), ("é" * 51, False, "longer than 100 bytes"),
    ("%date%", True, "use letters"), ("a:b", False, "use letters")])
def test_bad_output_names_are_refused_naming_the_input(value, subfolders, problem):
    with pytest.raises(ValueError, match="^output_name ") as error:
        check_output_name(value, "output_name", subfolders)
    assert problem in str(error.value) and len(str(error.value)) < 300


def test_written_files_notice_a_deleted_or_replaced_output(tmp_path):
    written, path = WrittenFiles(), tmp_path / "c.safetensors"
    assert written.intact(str(path))  # never written here: nothing to notice
    path.write_bytes(b"one")
    written.record(str(path))
    assert written.intact(str(path))
    path.write_bytes(b"other content")
    assert not written.intact(str(path))
    written.record(str(path))
    path.unlink()
    assert not written.intact(str(path))


def fused_file(tmp_path, name, entries, tensors=None):
    metadata = {"mixofshow.concepts": entries if isinstance(entries, str) else json.dumps(entries)}
    tensors = tensors if tensors is not None else {"mixofshow.embedding.<a1>": torch.zeros(16, 768)}
    save_file(tensors, str(tmp_path / name), metadata=metadata)
    return str(tmp_path / name)


@pytest.mark.parametrize("name, entries, tensors, message", [
    ("json.safetensors", "[{", None, "mixofshow.concepts metadata must be a JSON list"),
    ("nolist.safetensors", {"word": "<a1>"}, None, "must be a JSON list"),
    ("noword.safetensors", [{"source": "x"}], None, "must be a JSON list"),
    ("twice.safetensors", [{"word": "<a1>"}, {"word": "<a1>"}], None, "lists a word twice"),
    ("missing.safetensors", [{"word": "<b1>"}], None, "names <b1> but the file has no embedding"),
    ("shape.safetensors", [{"word": "<a1>"}], {"mixofshow.embedding.<a1>": torch.zeros(16, 1024)},
     "embedding of <a1> is [16, 1024], expected [16, 768]"),
    ("vector.safetensors", [{"word": "<a1>"}], {"mixofshow.embedding.<a1>": torch.zeros(768)}, "is [768]"),
    ("nan.safetensors", [{"word": "<a1>"}], {"mixofshow.embedding.<a1>": torch.full((16, 768), float("nan"))},
     "must hold finite floating-point numbers"),
    ("bare.safetensors", [{"word": "a1"}], {"mixofshow.embedding.a1": torch.zeros(16, 768)},
     "concept word 'a1' must look like <name>"),
])
def test_fused_checkpoint_metadata_and_embeddings_are_checked(tmp_path, name, entries, tensors, message):
    path = fused_file(tmp_path, name, entries, tensors)
    with pytest.raises(ValueError) as error:
        read_concepts(path)
    assert str(error.value).startswith(f"{name}: ") and message in str(error.value), str(error.value)


def test_unreadable_fused_checkpoint_names_the_file(tmp_path):
    good = fused_file(tmp_path, "good.safetensors", [{"word": "<a1>", "source": "a.safetensors"}])
    assert [(w, s) for w, _, s in read_concepts(good)] == [("<a1>", "a.safetensors")]
    data = open(good, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(FusedCheckpointError, match=r"^cut.safetensors: not a readable .safetensors file"):
        read_concepts(str(tmp_path / "cut.safetensors"))
