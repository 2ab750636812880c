import pytest
import torch

from chip_ext import Importance


def make():
    W = {"a": torch.tensor([[0.0, 2.0, -1.0], [3.0, 0.0, 1.0]]), "b": torch.rand(2, 5)}
    return Importance(W, [7, 3], class_names=["seven", "three"], meta={"seed": 1, "lam": torch.ones(2)})


def test_save_load_roundtrip_weights_only(tmp_path):
    imp = make()
    path = tmp_path / "imp.pt"
    imp.save(path)
    raw = torch.load(path, weights_only=True)  # safe loading works on the file as written
    assert raw["format"] == "chip_ext.Importance"
    back = Importance.load(path)
    assert back.layers == ["a", "b"] and back.classes == [7, 3] and back.class_names == ["seven", "three"]
    assert torch.equal(back.weights["a"], imp.weights["a"]) and back.meta["seed"] == 1


def test_intercepts_roundtrip_and_old_files(tmp_path):
    W = {"a": torch.rand(2, 3)}
    imp = Importance(W, [7, 3], intercepts={"a": torch.tensor([0.5, -1.0])})
    imp.save(tmp_path / "i.pt")
    back = Importance.load(tmp_path / "i.pt")
    assert torch.equal(back.intercepts["a"], torch.tensor([0.5, -1.0]))
    assert torch.load(tmp_path / "i.pt", weights_only=True)["format_version"] == 3
    # a version-1 file (no intercepts, no feature means) still loads
    state = make().state_dict()
    state["format_version"] = 1
    del state["intercepts"], state["feature_means"]
    torch.save(state, tmp_path / "v1.pt")
    old = Importance.load(tmp_path / "v1.pt")
    assert old.intercepts is None and old.layers == ["a", "b"]
    with pytest.raises(ValueError, match=r"intercepts\['a'\] must be a Tensor\[C\] with C=2; got \[3\]"):
        Importance(W, [7, 3], intercepts={"a": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"intercepts must have the layers of weights \['a'\]; got \['b'\]"):
        Importance(W, [7, 3], intercepts={"b": torch.zeros(2)})


def test_top_channels():
    imp = make()
    idx, val = imp.top_channels(7, 2, layer="a")
    assert idx.tolist() == [1, 0] and val.tolist() == [2.0, 0.0]
    idx, _ = imp.top_channels("three", 1, layer="a")
    assert idx.tolist() == [0]
    with pytest.raises(KeyError, match="class 5 was not distilled"):
        imp.top_channels(5)
    with pytest.raises(KeyError, match="layer 'c' not in this Importance"):
        imp.top_channels(7, layer="c")


def test_corrupt_and_foreign_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable chip_ext Importance file"):
        Importance.load(tmp_path / "junk.pt")
    torch.save({"state": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a chip_ext Importance file"):
        Importance.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        Importance.load(tmp_path / "missing.pt")


def test_bad_construction():
    with pytest.raises(ValueError, match=r"weights\['a'\] must be a Tensor\[C, K\] with C=2; got \[3, 4\]"):
        Importance({"a": torch.zeros(3, 4)}, [0, 1])
    with pytest.raises(ValueError, match="one name per class"):
        Importance({"a": torch.zeros(2, 4)}, [0, 1], class_names=["x"])


def test_bad_contents_are_refused():
    """NaN weights gave all-zero maps silently; duplicate classes left rows unreachable, and a duplicate name
    found only its first row; top_channels(0.7) was class 0."""
    import pytest

    with pytest.raises(ValueError, match=r"weights\['l'\] must be finite floating-point; it has 3 NaN/Inf entries"):
        Importance({"l": torch.tensor([[1.0, float("nan")], [float("inf"), float("-inf")]])}, [0, 1])
    with pytest.raises(ValueError, match=r"classes must be distinct .*\[1\] appear more than once"):
        Importance({"l": torch.zeros(3, 2)}, [1, 2, 1])
    twice = Importance({"l": torch.zeros(3, 2)}, [134, 517, 2], class_names=["crane", "crane", "shark"])
    with pytest.raises(KeyError, match=r"class name 'crane' is ambiguous: it names classes \[134, 517\]; pass the "
                                       r"class index"):
        twice.row("crane")  # ImageNet's own names repeat: refused where a name is looked up, not at construction
    assert twice.row(517) == 1 and twice.row("shark") == 2
    imp = Importance({"l": torch.tensor([[1.0, 2.0], [3.0, 0.0]])}, [4, 0])
    for bad in (0.7, True, None):
        with pytest.raises(TypeError, match="a class is a model output index"):
            imp.top_channels(bad)
    assert imp.row(torch.tensor(0)) == 1 and imp.top_channels(0, k=1)[0].tolist() == [0]


def test_top_channels_by_effect_and_by_weight(tmp_path):
    """The effect W·z̄ ranks what removing a channel does: channel 0 has the largest weight but is almost
    never active, channel 2 a smaller weight on a large mean activation."""
    W = {"a": torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.5, 0.2, 0.1, 0.4]])}
    means = {"a": torch.tensor([[0.01, 1.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0]])}
    imp = Importance(W, [7, 3], feature_means=means)
    idx, val = imp.top_channels(7, 3)
    assert idx.tolist() == [2, 1, 0] and torch.allclose(val, torch.tensor([8.0, 1.0, 0.03]))
    assert imp.top_channels(7, 3, by="weight")[0].tolist() == [0, 2, 1]
    assert torch.equal(imp.effect("a"), W["a"] * means["a"])
    imp.save(tmp_path / "i.pt")
    assert torch.equal(Importance.load(tmp_path / "i.pt").feature_means["a"], means["a"])
    plain = Importance(W, [7, 3])
    assert plain.top_channels(7, 1)[0].tolist() == [0]  # without means: by weight
    with pytest.raises(ValueError, match="has no feature_means"):
        plain.top_channels(7, 1, by="effect")
    with pytest.raises(ValueError, match="by must be 'effect' or 'weight'"):
        imp.top_channels(7, 1, by="size")
    with pytest.raises(ValueError, match=r"feature_means\['a'\] must be a Tensor\[2, 4\]"):
        Importance(W, [7, 3], feature_means={"a": torch.zeros(2, 3)})



def test_imagenet_names_with_repeats_build_an_importance():
    """All 1000 ImageNet classes with their short names (two 'crane's, two 'maillot's): distilling them must
    not fail after the pass."""
    from chip_ext import models

    names = models.class_names_for("efficientnet_lite0")  # timm's short names (torchvision's are unique)
    imp = Importance({"l": torch.zeros(1000, 2)}, list(range(1000)), class_names=names)
    assert imp.row("tabby") == 281 and names.count("crane") == 2
    with pytest.raises(KeyError, match="ambiguous"):
        imp.row("crane")
