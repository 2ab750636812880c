"""Checkpoint files of a distillation: the running sums and the loader position, written atomically,
one file per process (or per rank under torch.distributed: `<path>.rank<r>of<world>.pos<images>` and
`.complete`), and read back only when they were written by the same configuration and model; and
`CheckpointedRun`, the checkpoint side of a distillation run (save, resume, when to save)."""
from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import distributed
from ..kernels import ops
from ..importance import atomic_save
from .batches import images_of
from .fingerprints import image_fingerprint

CHECKPOINT_FORMAT = "chip_ext.distill.checkpoint"
# 3: the first moments Σ f h z and Σ f h g (for fit_intercept) join the sums. 1-2 lack them.
# 4: the checksum covers the whole state (σ, classes, configuration), the configuration the autocast dtype.
CHECKPOINT_VERSION = 4


def rank_checkpoint(path: Path, rank: int, world: int, key: int | str) -> Path:
    """The file of rank `rank` of `world` at loader position `key` (an int) or "complete"."""
    tail = "complete" if key == "complete" else f"pos{int(key)}"
    return path.with_name(f"{path.name}.rank{rank}of{world}.{tail}")


def list_rank_checkpoints(path: Path) -> dict[tuple[int, int], list[int | str]]:
    """{(rank, world): [keys]} of the per-rank checkpoint files beside `path`."""
    pattern = re.compile(re.escape(path.name) + r"\.rank(\d+)of(\d+)\.(complete|pos(\d+))$")
    found: dict[tuple[int, int], list[int | str]] = {}
    if path.parent.is_dir():
        for f in path.parent.iterdir():
            m = pattern.match(f.name)
            if m:
                key = "complete" if m.group(3) == "complete" else int(m.group(4))
                found.setdefault((int(m.group(1)), int(m.group(2))), []).append(key)
    return found


def choose_resume_point(keys_per_rank: Sequence[Sequence[int | str]]) -> int | str | None:
    """Where every rank can resume from: "complete" when every rank has its finished file, else the
    latest loader position that every rank saved (ranks keep two generations, so a rank killed while
    saving still shares the previous one), else None (start over)."""
    if all("complete" in keys for keys in keys_per_rank):
        return "complete"
    positions = [{k for k in keys if k != "complete"} for keys in keys_per_rank]
    common = set.intersection(*positions) if positions else set()
    return max(common) if common else None


def foreign_checkpoints(path: Path, found: dict, rank: int, world: int) -> str | None:
    """Why the files at `path` (rank files `found` by list_rank_checkpoints) cannot be resumed by
    rank `rank` of `world` processes, or None."""
    others = sorted({w for (_, w) in found if w != world})
    if world == 1 and others:
        return (f"{path} does not exist, but per-rank checkpoints of a run with {others[0]} processes "
                f"do ({path.name}.rank*of{others[0]}.*): resume with torchrun --nproc_per_node... "
                f"giving {others[0]} processes in all, or pass another checkpoint path")
    if world > 1 and path.exists():
        return (f"{path} is a single-process checkpoint; resume it without torch.distributed, or "
                f"pass another checkpoint path")
    if world > 1 and others and not found.get((rank, world)):
        return (f"the checkpoints at {path} were written by {others} processes, not {world}; "
                f"resume with the same number of processes, or pass another checkpoint path")
    return None


def checksum(state: dict) -> str:
    """sha256 of the whole state but its checksum: the running sums, the counters, the configuration,
    σ, the classes and every other entry, so an edited or bit-flipped file is found on load instead of
    resuming with wrong sums or settings."""
    h = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(b"{")
            for key in sorted(value, key=str):
                if key != "checksum":
                    h.update(f"{key!r}:".encode())
                    feed(value[key])
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for v in value:
                feed(v)
                h.update(b",")
            h.update(b"]")
        else:
            h.update(f"{type(value).__name__}:{value!r};".encode())

    feed(state)
    return h.hexdigest()


class CheckpointLock:
    """An exclusive lock on a checkpoint path for the whole run (`<path>.lock`, or one per rank under
    torch.distributed; fcntl.flock, released by the system if the process dies): a second process
    that would write the same checkpoint is refused with the holder's pid, instead of the two
    overwriting each other's sums. Where fcntl does not exist (Windows) nothing is locked."""

    def __init__(self, path: Path, rank: int = 0, world: int = 1):
        path = Path(path)
        name = f"{path.name}.lock" if world == 1 else f"{path.name}.rank{rank}of{world}.lock"
        self.path, self.lock_path, self.fd = path, path.with_name(name), None

    def __enter__(self) -> "CheckpointLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"checkpoint {self.path} is being written by another process (pid {holder}; lock "
                             f"{self.lock_path}): two runs on one checkpoint would overwrite each other's sums. "
                             "Wait for that run to end, or pass another checkpoint path") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_checkpoint(state: dict, path: Path, rank: int = 0, world: int = 1) -> Path:
    """Writes `state` (from the run; "complete" and "position" say which file) atomically. Under
    torch.distributed the rank's file is named by its position, and the rank keeps the newest other
    position besides it: a rank killed while saving still shares the previous one with the others."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    state["checksum"] = checksum(state)
    if world == 1:
        atomic_save(state, path)
        return path
    key = "complete" if state["complete"] else state["position"]
    target = rank_checkpoint(path, rank, world, key)
    atomic_save(state, target)
    keys = list_rank_checkpoints(path).get((rank, world), [])
    positions = sorted((k for k in keys if k != "complete"), reverse=True)
    for k in positions[1:] if key == "complete" else positions[2:]:
        rank_checkpoint(path, rank, world, k).unlink(missing_ok=True)
    return target


def read_checkpoint(path: Path, config: dict) -> dict:
    """The state in `path`, checked: a chip_ext checkpoint of this format version, written with the
    same `config` (model, layers, gates, ...). ValueError saying why otherwise."""
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is an empty file (0 bytes: a write that never happened?); delete it "
                         "or pass another checkpoint path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"checkpoint {path} cannot be read (corrupt or not a chip_ext checkpoint): {reason}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a chip_ext distillation checkpoint")
    version = state.get("version", 1)
    if version != CHECKPOINT_VERSION:
        why = ("it was written by an older chip_ext and lacks the first-moment sums (Σ f h z, Σ f h g) "
               "that fit_intercept needs" if version < 3 else
               "it was written by an older chip_ext, whose checksum did not cover σ, the classes and the "
               "configuration" if version < CHECKPOINT_VERSION else "it was written by a newer chip_ext")
        raise ValueError(f"checkpoint {path} has format version {version}; this chip_ext reads version "
                         f"{CHECKPOINT_VERSION}: {why}. Distil again with another checkpoint path "
                         "(or delete the file)")
    if state.get("checksum") != checksum(state):
        raise ValueError(f"checkpoint {path} is corrupt: its sums do not match the checksum written with them. "
                         "Delete it (or pass another checkpoint path) and distil again")
    if state["config"] != config:
        diff = {k: (state["config"].get(k), v) for k, v in config.items() if state["config"].get(k) != v}
        raise ValueError(
            f"checkpoint {path} was written by a different configuration; differing (checkpoint, now): "
            f"{diff}. Use another checkpoint path or the same arguments and model.")
    return state


class CheckpointedRun:
    """The checkpoint side of a distillation run (`streaming.Run` inherits it): the state written to
    disk, reading it back, choosing the resume point (all ranks together under torch.distributed) and
    when to save. Uses the run's config, position, sums (`states`) and rank/world."""

    def _state(self) -> dict:
        return {
            "config": self.config, "seen": self.seen,
            "position": self.position, "complete": self.complete, "classes": self.classes,
            "num_outputs": self.num_outputs, "world": self.world, "rank": self.rank,
            "first_image": self.first_image, "max_images": self.max_images, "loader_images": self.loader_images,
            # per-rank loaders (RankSlice): the images read from this rank's own loader; None: a shared loader
            "local_position": self.local_position if getattr(self, "per_rank", False) else None,
            "layers": {s.name: {"shape": s.shape, "sigma": s.sigma, "rows": s.rows,
                                "acc": None if s.acc is None else [t.cpu() for t in s.acc]}
                       for s in self.states},
        }

    def save(self, path) -> None:
        for name in ("flush_gram", "flush_nonfinite"):  # held statistics into the sums; a GPU batch's NaN/Inf
            flush = getattr(self, name, None)  # flag is read late: never save sums it would refuse
            if flush is not None:
                flush()
        write_checkpoint(self._state(), Path(path), self.rank, self.world)

    def _load(self, path: Path) -> None:
        state = read_checkpoint(path, self.config)
        self.seen, self.complete = int(state["seen"]), bool(state["complete"])
        self.position = int(state["position"])
        self.resumed_at = self.position
        self.first_image = state["first_image"]
        self.recorded = {"max_images": state["max_images"], "loader_images": state["loader_images"]}
        self._load_local_position(path, state.get("local_position"))
        if not self.complete and self.max_images is not None and self.position > self.max_images:
            raise ValueError(f"checkpoint {path} already holds {self.position} images, more than max_images="
                             f"{self.max_images}; pass max_images >= {self.position} (or None), or another path")
        self.classes, self.num_outputs = state["classes"], state["num_outputs"]
        if self.classes is not None:
            self._class_index = torch.tensor(self.classes, device=self.device)
        for s in self.states:
            saved = state["layers"][s.name]
            s.shape, s.sigma = saved["shape"], saved["sigma"]
            s.rows = tuple(saved["rows"]) if saved.get("rows") is not None else None
            if saved["acc"] is not None:
                s.acc = ops.Accumulators(*(t.to(self.device) for t in saved["acc"]))

    def _load_local_position(self, path: Path, local: int | None) -> None:
        """Where this rank's own loader resumes (per-rank loaders). A checkpoint of a loader shared by all ranks
        holds every image with a global index below its position, so rank r's own loader skips its share of
        them; the reverse (a per-rank checkpoint read through a shared loader) cannot be resumed."""
        if getattr(self, "per_rank", False):
            if local is None:
                local = len(range(self.rank, self.position, self.world))
                if self.rank != 0:
                    self.first_image = None  # the shared loader's first image is rank 0's; record this rank's
            self.local_position = int(local)
        elif local is not None and not self.complete:
            raise ValueError(f"checkpoint {path} was written with per-rank loaders (a DataLoader over "
                             "chip_ext.data.RankSlice on every rank); resume it with them, or pass another "
                             "checkpoint path")

    def resume(self, path) -> bool:
        path = Path(path)
        found = list_rank_checkpoints(path)
        problem = foreign_checkpoints(path, found, self.rank, self.world)
        if self.world == 1:
            if problem:
                raise ValueError(problem)
            if not path.exists():
                return False
            self._load(path)
            return True
        # every rank must take the same decision, and every rank must fail when one cannot go on
        keys = found.get((self.rank, self.world), [])
        gathered = distributed.all_gather_object((keys, problem))
        distributed.raise_if_any([p for _, p in gathered])
        choice = choose_resume_point([k for k, _ in gathered])
        if choice is None:
            return False
        problem = None
        try:
            self._load(rank_checkpoint(path, self.rank, self.world, choice))
        except ValueError as err:
            problem = str(err)
        distributed.raise_if_any(distributed.all_gather_object(problem))
        return True

    def _time_to_save(self, last_save: float, every: float) -> bool:
        """Whether to save now; under torch.distributed all ranks decide together (a 1-int all-reduce),
        so their files hold the same loader position."""
        due = time.monotonic() - last_save >= every
        return due if self.world == 1 else distributed.any_rank(due, self.comm_device)

    def _check_first_image(self, x: Tensor, checkpoint) -> None:
        """The loader's first image must be the one the checkpoint was written with: another loader,
        order or preprocessing would add other images' sums to the old ones."""
        fp = image_fingerprint(x[0])
        if self.first_image is None:
            self.first_image = fp
        elif fp != self.first_image:
            raise ValueError(f"the loader's first image is not the one checkpoint {checkpoint} was written with "
                             "(another dataset, order, transform or batch layout): resume with the same loader, "
                             "or pass another checkpoint path")

    def check_finished_run(self, loader, checkpoint) -> None:
        """A finished checkpoint is re-solved without reading the images; it must be the same run:
        max_images and the dataset's length as recorded, and the loader's first image (read when the
        loader has any: pass an empty list to re-solve from the sums alone)."""
        recorded = self.recorded
        if recorded.get("max_images") != self.max_images:
            raise ValueError(f"checkpoint {checkpoint} is a finished run with max_images={recorded.get('max_images')}; "
                             f"now max_images={self.max_images}. Pass the same max_images, or another checkpoint path "
                             "for another run")
        if None not in (recorded.get("loader_images"), self.loader_images) \
                and recorded["loader_images"] != self.loader_images:
            raise ValueError(f"checkpoint {checkpoint} was finished over a dataset of {recorded['loader_images']} images; "
                             f"this loader's has {self.loader_images}: another dataset? Pass another checkpoint path")
        counted = 0
        for item_index, item in enumerate(loader):
            x = images_of(item, item_index, allow_uint8=self.normalize is not None)
            if x.shape[0] == 0:
                continue
            if counted == 0:
                self._check_first_image(x, checkpoint)
            if not isinstance(loader, (list, tuple)):
                break  # only a list in memory is cheap to count
            counted += x.shape[0]
        if isinstance(loader, (list, tuple)) and counted:  # an empty list re-solves from the sums alone
            if self.max_images is not None:
                counted = min(counted, self.max_images)
            if counted != self.position:
                raise ValueError(f"checkpoint {checkpoint} is a finished run over {self.position} images; this "
                                 f"loader has {counted}: another dataset? Pass another checkpoint path to distil "
                                 "these images (or the same loader to re-solve the finished run)")
