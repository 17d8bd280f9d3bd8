"""Atomic writes: temp names no model list shows, leftovers of a killed save removed, NaN never written."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from comfyui_mixofshow.harness import ROOT
from comfyui_mixofshow.mixofshow_core import safe_io
from comfyui_mixofshow.mixofshow_core.safe_io import (NonFiniteError, atomic_write, check_finite,
                                                      remove_partial_files, save_safetensors)

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".sft", ".fusionstats")


def test_temp_file_has_no_listed_extension_and_is_renamed_over_the_target(tmp_path):
    seen = []

    def write(tmp):
        seen.append(os.path.basename(tmp))
        with open(tmp, "wb") as f:
            f.write(b"data")

    atomic_write(str(tmp_path / "model.safetensors"), write)
    assert seen[0].startswith(".model.safetensors.partial-") and not seen[0].endswith(MODEL_EXTENSIONS)
    assert os.listdir(tmp_path) == ["model.safetensors"]


KILLED_SAVE = textwrap.dedent("""
    import os, sys, threading, time
    sys.path.insert(0, sys.argv[2])
    import torch
    from mixofshow_core.safe_io import save_safetensors
    folder = sys.argv[1]
    def kill_once_the_library_writes():
        while not any(n.startswith(".tmp") for n in os.listdir(folder)):
            time.sleep(0.001)
        os._exit(3)
    threading.Thread(target=kill_once_the_library_writes, daemon=True).start()
    save_safetensors({"w": torch.zeros(100_000_000)}, os.path.join(folder, "fused.safetensors"))
""")


def test_leftovers_of_a_killed_save_are_removed_once_old_enough(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "sub").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder), str(ROOT)], capture_output=True)
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    leftovers = sorted(os.listdir(folder))
    ours = [n for n in leftovers if n.startswith(".fused.safetensors.partial-")]
    library = [n for n in leftovers if n.startswith(".tmp")]
    assert len(ours) == 1 and len(library) == 1 and len(leftovers) == 3, leftovers
    assert not any(n.endswith(MODEL_EXTENSIONS) for n in ours + library)
    kept = ["model.safetensors", ".hidden", ".x.partial-notours", "sub/.model.pth.partial-abcd1234"]
    (folder / ".tmp-abcd_123.safetensors").write_bytes(b"")  # the name older versions used
    for name in kept:
        (folder / name).write_bytes(b"x")
    assert remove_partial_files([str(folder)]) == []  # too young: may be a save still running
    old = 2000
    for name in ours + library + [".tmp-abcd_123.safetensors", "model.safetensors", ".hidden", ".x.partial-notours"]:
        os.utime(folder / name, (os.path.getmtime(folder / name) - old,) * 2)
    removed = remove_partial_files([str(folder), str(tmp_path / "missing")])
    assert sorted(os.path.basename(p) for p in removed) == sorted(ours + library + [".tmp-abcd_123.safetensors"])
    assert sorted(os.listdir(folder)) == sorted([".hidden", ".x.partial-notours", "model.safetensors", "sub"])
    assert os.listdir(folder / "sub") == [".model.pth.partial-abcd1234"]  # young


def test_non_finite_tensors_are_not_written(tmp_path):
    check_finite({"a": torch.ones(3), "ids": torch.arange(3)}, "ok.safetensors")
    bad = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NonFiniteError, match="fused.safetensors: not written, tensor b contains NaN or inf"):
        check_finite(bad, str(tmp_path / "fused.safetensors"))
    save_safetensors({"a": torch.ones(2)}, str(tmp_path / "fine.safetensors"))
    assert os.listdir(tmp_path) == ["fine.safetensors"]


def test_written_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    target = tmp_path / "out.safetensors"
    atomic_write(str(target), lambda tmp: open(tmp, "wb").write(b"x"))
    assert target.stat().st_mode & 0o777 == 0o666 & ~safe_io.UMASK   # as open() would create it
