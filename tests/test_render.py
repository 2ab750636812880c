"""Rendering writes valid PNGs of the expected size (opened and checked)."""
import numpy as np
import pytest
import torch
from PIL import Image

from chip_ext import Importance, render


def imgs(B=2, H=40, W=48):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(0))


def test_overlay_values():
    img = torch.zeros(3, 4, 5)
    heat = torch.zeros(4, 5)
    out = render.overlay(img, heat, alpha=0.0)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and out.max() == 0
    hot = render.overlay(torch.ones(3, 4, 5), torch.ones(4, 5), alpha=1.0, cmap="gray")
    assert (hot == 255).all()
    with pytest.raises(ValueError, match=r"heatmap must be \[H, W\] = \[4, 5\]"):
        render.overlay(img, torch.zeros(5, 4))


def test_save_overlay_png_size(tmp_path):
    p = render.save_overlay(tmp_path / "o.png", imgs()[0], torch.rand(40, 48))
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (48, 40)
    p = render.save_overlay(tmp_path / "g.png", imgs()[0], torch.randn(3, 40, 48))
    with Image.open(p) as im:
        assert im.size == (48, 40) and im.mode == "RGB"


def test_grid_png(tmp_path):
    x = imgs()
    cols = {"CHIP": torch.rand(2, 40, 48), "Grad-CAM": torch.rand(2, 40, 48), "Guided": torch.randn(2, 3, 40, 48)}
    p = render.save_grid(tmp_path / "grid.png", x, cols, row_titles=["cat (p=0.91)", "dog (p=0.40)"], dpi=50)
    with Image.open(p) as im:
        im.load()
        assert im.format == "PNG" and im.size == (round(2.4 * 4 * 50), round(2.5 * 2 * 50))
        assert np.asarray(im).std() > 10  # not blank
    with pytest.raises(ValueError, match="column 'bad' must hold one map per image"):
        render.save_grid(tmp_path / "x.png", x, {"bad": torch.rand(3, 40, 48)})


def test_channel_pictures(tmp_path):
    g = torch.Generator().manual_seed(1)
    imp = Importance({"l": torch.randn(4, 32, generator=g)}, [1, 5, 9, 12], class_names=["a", "b", "c", "d"])
    p = render.plot_channel_importance(imp, tmp_path / "fig9.png", dpi=40)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    info = render.top_channel_overlap(imp, ["a", "b", 9], k=5)
    assert np.array(info["overlap"]).diagonal().tolist() == [5, 5, 5]
    assert all(len(v) == 5 for v in info["top"].values())
    p = render.plot_top_channel_overlap(imp, ["a", "b", 9], tmp_path / "fig10.png", k=5, dpi=40)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_long_row_titles_stay_inside_the_figure():
    """Issue 14.11: 'n02102040_1003.JPEG: English springer (p=0.82)' was cut at the left edge."""
    import matplotlib.pyplot as plt

    from chip_ext import render

    title = "n02102040_1003.JPEG: English springer (p=0.82)"
    x = torch.rand(2, 3, 32, 32)
    fig = render.grid_figure(x, {"CHIP": torch.rand(2, 32, 32), "Grad-CAM": torch.rand(2, 32, 32)},
                             row_titles=[title, "short"])
    try:
        fig.canvas.draw()
        box = fig.axes[0].title.get_window_extent().transformed(fig.transFigure.inverted())
        assert box.x0 >= 0 and box.x1 <= 1, box
        assert fig.axes[0].title.get_text().replace("\n", " ") == title  # all of it, on lines
    finally:
        plt.close(fig)
    assert all(len(line) <= render.TITLE_CHARS for line in render.wrap_title(title).splitlines())


def test_top_channel_overlap_known_answer():
    """Issue 14.13: the overlap's off-diagonal entries were untested. Top-3 sets {0,1,2}, {2,3,4}, {0,2,4}."""
    from chip_ext import Importance, render

    W = torch.zeros(3, 6)
    W[0, [0, 1, 2]] = torch.tensor([3.0, 2.0, 1.0])
    W[1, [2, 3, 4]] = torch.tensor([1.0, 3.0, 2.0])
    W[2, [0, 2, 4]] = torch.tensor([2.0, 3.0, 1.0])
    imp = Importance({"l": W}, [10, 11, 12])
    info = render.top_channel_overlap(imp, [10, 11, 12], k=3)
    assert info["top"] == {"10": [0, 1, 2], "11": [2, 3, 4], "12": [0, 2, 4]}
    assert info["overlap"] == [[3, 1, 2], [1, 3, 2], [2, 2, 3]]
