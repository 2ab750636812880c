"""`Importance`: the class-by-channel importance matrices W that distillation learns, per layer."""
from __future__ import annotations

import glob
import operator
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "chip_ext.Importance"
# 2: intercepts (fit_intercept); version 1 files load with intercepts None.
# 3: feature_means (the class-weighted mean pooled features); version 1-2 files load with them None.
FORMAT_VERSION = 3


class Importance:
    """Learned channel importances of one model.

    weights: {layer: Tensor[C, K]} (float32, row i for class classes[i]); classes: the C class
    indices of the model's output they cover; class_names: optional names, one per class;
    intercepts: {layer: Tensor[C]} when distilled with fit_intercept=True, else None: the
    unpenalised per-class intercept of the Lasso (score ≈ W[c]·z + intercept[c]);
    feature_means: {layer: Tensor[C, K]} or None: per class, the mean of the pooled gated features z
    over the distillation's samples, weighted as the Lasso weights them (Σ f^c h z / Σ f^c h), so
    W[c, k] · feature_means[c, k] is channel k's mean contribution to class c's score: what removing
    it does (`top_channels(by="effect")`);
    meta: hyper-parameters, images seen, perturbations, seed, layer shapes, library version,
    model fingerprint, solver report, timings.
    """

    def __init__(self, weights: dict[str, Tensor], classes: list[int], *,
                 class_names: list[str] | None = None, meta: dict[str, Any] | None = None,
                 intercepts: dict[str, Tensor] | None = None, feature_means: dict[str, Tensor] | None = None):
        if not weights:
            raise ValueError("weights must hold at least one layer")
        C = len(classes)
        if len(set(int(c) for c in classes)) != C:
            dup = sorted({int(c) for c in classes if list(classes).count(c) > 1})
            raise ValueError(f"classes must be distinct (one row of W per class); {dup[:10]} appear more than once")
        for layer, W in weights.items():
            if not isinstance(W, Tensor) or W.dim() != 2 or W.shape[0] != C:
                shape = list(W.shape) if isinstance(W, Tensor) else type(W).__name__
                raise ValueError(f"weights[{layer!r}] must be a Tensor[C, K] with C={C}; got {shape}")
            if not W.is_floating_point() or not bool(torch.isfinite(W).all()):
                bad = int((~torch.isfinite(W)).sum()) if W.is_floating_point() else W.dtype
                raise ValueError(f"weights[{layer!r}] must be finite floating-point; it has "
                                 f"{bad} NaN/Inf entries" if W.is_floating_point() else
                                 f"weights[{layer!r}] must be floating-point; got {bad}")
        if intercepts is not None:
            if set(intercepts) != set(weights):
                raise ValueError(f"intercepts must have the layers of weights {list(weights)}; got {list(intercepts)}")
            for layer, b0 in intercepts.items():
                if not isinstance(b0, Tensor) or tuple(b0.shape) != (C,):
                    shape = list(b0.shape) if isinstance(b0, Tensor) else type(b0).__name__
                    raise ValueError(f"intercepts[{layer!r}] must be a Tensor[C] with C={C}; got {shape}")
        if feature_means is not None:
            if set(feature_means) != set(weights):
                raise ValueError(f"feature_means must have the layers of weights {list(weights)}; "
                                 f"got {list(feature_means)}")
            for layer, m in feature_means.items():
                if not isinstance(m, Tensor) or tuple(m.shape) != tuple(weights[layer].shape):
                    shape = list(m.shape) if isinstance(m, Tensor) else type(m).__name__
                    raise ValueError(f"feature_means[{layer!r}] must be a Tensor{list(weights[layer].shape)} like "
                                     f"weights[{layer!r}]; got {shape}")
                if not m.is_floating_point() or not bool(torch.isfinite(m).all()):
                    raise ValueError(f"feature_means[{layer!r}] must be finite floating-point values")
        if class_names is not None and len(class_names) != C:
            raise ValueError(f"class_names must have one name per class ({C}); got {len(class_names)}")
        self.weights = {k: v.detach().cpu() for k, v in weights.items()}
        self.intercepts = None if intercepts is None else {k: v.detach().cpu() for k, v in intercepts.items()}
        self.feature_means = (None if feature_means is None
                              else {k: v.detach().cpu().float() for k, v in feature_means.items()})
        self.classes = [int(c) for c in classes]
        self.class_names = list(class_names) if class_names is not None else None
        self.meta = dict(meta or {})

    @property
    def layers(self) -> list[str]:
        return list(self.weights)

    def row(self, cls: int | str) -> int:
        """Row of W for a class given by model output index or by name."""
        if isinstance(cls, str):
            if self.class_names is None or cls not in self.class_names:
                raise KeyError(f"class {cls!r} is not among the distilled class names")
            rows = [i for i, n in enumerate(self.class_names) if n == cls]
            if len(rows) > 1:  # ImageNet has two 'crane's and two 'maillot's
                raise KeyError(f"class name {cls!r} is ambiguous: it names classes {[self.classes[r] for r in rows]}; "
                               "pass the class index")
            return rows[0]
        try:
            if isinstance(cls, bool) or (isinstance(cls, Tensor) and cls.dtype == torch.bool):
                raise TypeError
            cls = operator.index(cls)  # ints, numpy and 0-d integer tensors; 0.7 is not class 0
        except TypeError:
            raise TypeError(f"a class is a model output index (int) or a class name (str); got {cls!r}") from None
        if int(cls) not in self.classes:
            raise KeyError(f"class {cls} was not distilled (distilled: {len(self.classes)} classes)")
        return self.classes.index(int(cls))

    def effect(self, layer: str | None = None) -> Tensor:
        """Tensor[C, K]: W[c, k] · feature_means[c, k], channel k's mean contribution to class c's score
        (in the target's units): what switching the channel off does, on average over the class's samples."""
        layer = self._layer(layer)
        if self.feature_means is None:
            raise ValueError("this Importance has no feature_means (written by an older chip_ext, or built by "
                             "hand): the effect needs them; distil again, or rank by='weight'")
        return self.weights[layer] * self.feature_means[layer]

    def top_channels(self, cls: int | str, k: int = 10, layer: str | None = None, *,
                     by: str | None = None) -> tuple[Tensor, Tensor]:
        """The k channels that matter most for `cls` -> (channel indices, their scores).

        by="effect" (the default when the importance has feature_means): the largest W[c, k] · z̄[c, k],
        the channels whose removal lowers the class's score most; by="weight": the largest W[c, k] (the
        paper's order, Fig. 9/10: a coefficient per unit of pooled activation, which ranks a rarely
        active channel with a large coefficient first)."""
        layer = self._layer(layer)
        by = by or ("effect" if self.feature_means is not None else "weight")
        if by not in ("effect", "weight"):
            raise ValueError(f"by must be 'effect' or 'weight'; got {by!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1; got {k!r}")
        row = self.row(cls)
        w = (self.effect(layer) if by == "effect" else self.weights[layer])[row]
        values, idx = torch.topk(w, min(k, w.numel()))
        return idx, values

    def _layer(self, layer: str | None) -> str:
        layer = layer or self.layers[-1]
        if layer not in self.weights:
            raise KeyError(f"layer {layer!r} not in this Importance (layers: {self.layers})")
        return layer

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "weights": self.weights,
                "intercepts": self.intercepts, "feature_means": self.feature_means, "classes": self.classes,
                "class_names": self.class_names, "meta": _plain(self.meta)}

    def save(self, path: str | os.PathLike) -> None:
        """Writes atomically (a temporary file renamed over `path`)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Importance":
        """Reads a file written by `save` with torch.load(weights_only=True)."""
        state = read_state(path, FORMAT, FORMAT_VERSION, "Importance", "Importance.save / chip-ext distill")
        return cls(state["weights"], state["classes"], class_names=state["class_names"],
                   meta=state["meta"], intercepts=state.get("intercepts"), feature_means=state.get("feature_means"))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {list(v.shape)}" for k, v in self.weights.items())
        return f"Importance({len(self.classes)} classes; {shapes})"


def read_state(path: str | os.PathLike, marker: str, version: int, what: str, writer: str) -> dict:
    """A dict written by torch.save with a "format" marker, read with torch.load(weights_only=True): a
    missing file, an unreadable one, another format or a newer version each get one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch's own text ends with advice to file a bug)
        import zipfile

        first = ("it is not a PyTorch file (torch.save writes a zip archive)" if not zipfile.is_zipfile(path)
                 else (str(err).strip().splitlines() or [type(err).__name__])[0][:200])
        raise ValueError(f"{path} is not a readable chip_ext {what} file (corrupt, or not written by "
                         f"{writer}): {first}") from err
    if not isinstance(state, dict) or state.get("format") != marker:
        raise ValueError(f"{path} is not a chip_ext {what} file (no '{marker}' marker)")
    if state.get("format_version", 0) > version:
        raise ValueError(f"{path} was written by a newer chip_ext (format "
                         f"{state['format_version']}; this one reads {version})")
    return state


def _plain(value: Any) -> Any:
    """Meta made of what torch.load(weights_only=True) accepts: dicts, lists, str, numbers, tensors."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None or isinstance(value, Tensor):
        return value
    return str(value)


TEMP_SUFFIX = ".partial"


def _writer_alive(temp: Path) -> bool:
    """Whether the process named in a temporary file's name (.<name>.<pid>.<hex>.partial) still runs."""
    parts = temp.name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    try:
        pid = int(parts[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return True  # this process's (another thread's write: a failed write removes its own file)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`: a reader sees
    the old file or the new one, never half of one. The file gets the mode torch.save would give it
    (0666 less the umask). Temporary files of `path` left by a process killed while writing are
    removed first. A failed write (e.g. a full disk) raises OSError naming the file and the cause."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        if not _writer_alive(stale):  # another live process may be writing it right now
            stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            free = shutil.disk_usage(path.parent).free
            raise OSError(f"could not write {path}: {err}"
                          + (f" (the disk is full: {free} bytes free in {path.parent})" if free < (64 << 20) else "")
                          ) from err
        raise
