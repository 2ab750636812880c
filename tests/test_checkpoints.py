"""Checkpoint files (chip_ext/checkpoints.py, atomic_save): what a kill, a flipped bit, another loader
or a full disk do to them (issue 14.5)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chip_ext
from chip_ext.importance import TEMP_SUFFIX, atomic_save
from test_distillation import Crashing, SmallCNN, batches

COMMON = dict(num_perturbations=4, progress=False)

KILLED_WHILE_SAVING = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
import chip_ext
from test_distillation import SmallCNN, batches
real = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
chip_ext.distill(SmallCNN(), batches(4), "relu2", num_perturbations=4, progress=False, checkpoint={ck!r},
                 checkpoint_every=0)
"""


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def test_a_kill_while_saving_leaves_no_temp_file_behind(tmp_path):
    ck = tmp_path / "run.ckpt"
    script = KILLED_WHILE_SAVING.format(tests=str(Path(__file__).parent), ck=str(ck))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not ck.exists() and len(temp_files(tmp_path)) == 1  # what the kill left
    imp = chip_ext.distill(SmallCNN(), batches(4), "relu2", checkpoint=ck, checkpoint_every=0, **COMMON)
    assert temp_files(tmp_path) == [] and ck.exists() and imp.meta["images_seen"] == 16


def test_a_flipped_bit_is_found(tmp_path):
    ck = tmp_path / "run.ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        chip_ext.distill(SmallCNN(), Crashing(batches(6), 3), "relu2", checkpoint=ck, checkpoint_every=0, **COMMON)
    state = torch.load(ck, weights_only=True)
    G = state["layers"]["relu2"]["acc"][0]
    bits = G.view(torch.int64)
    bits[2, 7] ^= 1 << 40  # one bit of one float64
    torch.save(state, ck)
    with pytest.raises(ValueError, match=r"checkpoint .*run.ckpt is corrupt: its sums do not match the checksum"):
        chip_ext.distill(SmallCNN(), batches(6), "relu2", checkpoint=ck, **COMMON)


def test_a_finished_checkpoint_is_the_same_run_or_refused(tmp_path):
    ck = tmp_path / "run.ckpt"
    data = batches(4)
    ref = chip_ext.distill(SmallCNN(), data, "relu2", checkpoint=ck, max_images=8, **COMMON)
    assert ref.meta["images_seen"] == 8
    with pytest.raises(ValueError, match=r"finished run with max_images=8; now max_images=None"):
        chip_ext.distill(SmallCNN(), data, "relu2", checkpoint=ck, **COMMON)
    with pytest.raises(ValueError, match=r"the loader's first image is not the one checkpoint .* was written with"):
        chip_ext.distill(SmallCNN(), batches(4, seed=9), "relu2", checkpoint=ck, max_images=8, **COMMON)
    again = chip_ext.distill(SmallCNN(), data, "relu2", checkpoint=ck, max_images=8, **COMMON)
    solved = chip_ext.distill(SmallCNN(), [], "relu2", checkpoint=ck, max_images=8, **COMMON)  # sums alone
    assert torch.equal(again.weights["relu2"], ref.weights["relu2"])
    assert torch.equal(solved.weights["relu2"], ref.weights["relu2"])


def test_a_shorter_or_other_loader_does_not_resume(tmp_path):
    ck = tmp_path / "run.ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        chip_ext.distill(SmallCNN(), Crashing(batches(6), 3), "relu2", checkpoint=ck, checkpoint_every=0, **COMMON)
    assert torch.load(ck, weights_only=True)["position"] == 12
    with pytest.raises(ValueError, match=r"the loader ended after 8 images, but checkpoint .* holds 12"):
        chip_ext.distill(SmallCNN(), batches(2), "relu2", checkpoint=ck, **COMMON)
    with pytest.raises(ValueError, match=r"the loader's first image is not the one"):
        chip_ext.distill(SmallCNN(), batches(6, seed=3), "relu2", checkpoint=ck, **COMMON)
    with pytest.raises(ValueError, match=r"already holds 12 images, more than max_images=10"):
        chip_ext.distill(SmallCNN(), batches(6), "relu2", checkpoint=ck, max_images=10, **COMMON)
    done = chip_ext.distill(SmallCNN(), batches(6), "relu2", checkpoint=ck, **COMMON)
    assert done.meta["resumed_at_image"] == 12 and done.meta["images_seen"] == 24


def test_a_full_disk_says_so(tmp_path, monkeypatch):
    import shutil

    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 5696 vs 5600")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=r"could not write .*run.ckpt: .*unexpected pos.* \(the disk is full: 0 bytes "
                                      r"free in"):
        atomic_save({"x": 1}, tmp_path / "run.ckpt")
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_files_get_the_mode_torch_save_gives(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"x": 1}, tmp_path / "a.pt")
        torch.save({"x": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o644


def crashed_run(ck, **kwargs):
    with pytest.raises(RuntimeError, match="simulated crash"):
        chip_ext.distill(SmallCNN(), Crashing(batches(6), 3), "relu2", checkpoint=ck, checkpoint_every=0,
                         **{**COMMON, **kwargs})


@pytest.mark.parametrize("edit", ["sigma", "classes", "config"])
def test_an_edited_checkpoint_is_found(tmp_path, edit):
    """The checksum covered only the sums and counters: a checkpoint edited to sigma 0.3, to class order
    [1, 0], or to another configuration resumed silently."""
    ck = tmp_path / "run.ckpt"
    crashed_run(ck, classes=[0, 1])
    state = torch.load(ck, weights_only=True)
    if edit == "sigma":
        state["layers"]["relu2"]["sigma"] = 0.3
    elif edit == "classes":
        state["classes"] = [1, 0]
    else:
        state["config"]["max_drop"] = 0.25
        state["max_images"] = 99
    torch.save(state, ck)
    with pytest.raises(ValueError, match=r"is corrupt: its sums do not match the checksum"):
        chip_ext.distill(SmallCNN(), batches(6), "relu2", checkpoint=ck, classes=[0, 1], **COMMON)


@pytest.mark.parametrize("changed, pattern", [
    (dict(seed=1), r"'seed': \(0, 1\)"),
    (dict(autocast_dtype=torch.bfloat16), r"'autocast': \(None, 'torch.bfloat16'\)"),
])
def test_resuming_with_another_seed_or_autocast_is_refused(tmp_path, changed, pattern):
    """A seed-0 checkpoint resumed under seed 1 would mix two gate streams; fp32 sums resumed under bf16
    autocast would mix two precisions."""
    ck = tmp_path / "run.ckpt"
    crashed_run(ck)
    with pytest.raises(ValueError, match=r"written by a different configuration; differing \(checkpoint, now\): .*"
                                         + pattern):
        chip_ext.distill(SmallCNN(), batches(6), "relu2", checkpoint=ck, **COMMON, **changed)


def test_a_second_writer_is_refused_and_keeps_the_first_ones_files(tmp_path):
    """Two processes on one checkpoint path: each save deleted the other's live temporary file and the
    other died ('No such file or directory: ...partial')."""
    from chip_ext.checkpoints import CheckpointLock

    ck = tmp_path / "run.ckpt"
    with CheckpointLock(ck):  # another run holds the path
        with pytest.raises(ValueError, match=rf"checkpoint .*run.ckpt is being written by another process "
                                             rf"\(pid {os.getpid()}; lock .*run.ckpt.lock\)"):
            chip_ext.distill(SmallCNN(), batches(2), "relu2", checkpoint=ck, **COMMON)
    assert not ck.exists()
    imp = chip_ext.distill(SmallCNN(), batches(2), "relu2", checkpoint=ck, **COMMON)  # free again
    assert ck.exists() and imp.meta["images_seen"] == 8


def test_a_live_writers_temporary_file_is_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".run.ckpt.{sleeper.pid}.abcd1234{TEMP_SUFFIX}"
        live.write_bytes(b"being written")
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
        dead = tmp_path / f".run.ckpt.{dead_pid}.deadbeef{TEMP_SUFFIX}"
        dead.write_bytes(b"left by a killed writer")
        atomic_save({"x": 1}, tmp_path / "run.ckpt")
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_final_save_returns_the_importance(tmp_path, monkeypatch):
    """A full disk at the final save lost the finished pass (distill raised)."""
    from chip_ext.checkpoints import CheckpointedRun

    real = CheckpointedRun.save

    def save(self, path):
        if self.complete:
            raise OSError(f"could not write {path}: [Errno 28] No space left on device")
        real(self, path)

    monkeypatch.setattr(CheckpointedRun, "save", save)
    ck = tmp_path / "run.ckpt"
    ref = chip_ext.distill(SmallCNN(), batches(3), "relu2", **COMMON)
    with pytest.warns(UserWarning, match=r"the pass over the images finished, but its final checkpoint could not "
                                         r"be written \(could not write .*No space left"):
        imp = chip_ext.distill(SmallCNN(), batches(3), "relu2", checkpoint=ck, checkpoint_every=0, **COMMON)
    assert torch.equal(imp.weights["relu2"], ref.weights["relu2"])


def test_an_empty_checkpoint_file_says_so(tmp_path):
    ck = tmp_path / "run.ckpt"
    ck.write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint .*run.ckpt is an empty file \(0 bytes"):
        chip_ext.distill(SmallCNN(), batches(2), "relu2", checkpoint=ck, **COMMON)


def test_a_finished_checkpoint_and_a_longer_list_loader_is_refused(tmp_path):
    """It returned the old W (images_seen 4 instead of 10) without a word."""
    ck = tmp_path / "run.ckpt"
    chip_ext.distill(SmallCNN(), batches(1), "relu2", checkpoint=ck, **COMMON)
    with pytest.raises(ValueError, match=r"is a finished run over 4 images; this loader has 12"):
        chip_ext.distill(SmallCNN(), batches(3), "relu2", checkpoint=ck, **COMMON)
