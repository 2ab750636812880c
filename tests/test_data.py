"""Readers of the three box formats, the ImageNet label mapping, and box rescaling."""
import numpy as np
import pytest
import torch
from PIL import Image

from chip_ext import data
from shared_data import data_dir

XML = """<annotation><folder>val</folder><filename>ILSVRC2012_val_00000001</filename>
<size><width>500</width><height>250</height><depth>3</depth></size>
<object><name>n01751748</name><bndbox><xmin>100</xmin><ymin>50</ymin><xmax>300</xmax><ymax>200</ymax></bndbox></object>
<object><name>n01751748</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
</annotation>"""


def test_voc_xml_reader(tmp_path):
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "a.xml").write_text(XML)
    (s,) = data.read_voc_xml(tmp_path / "xml", tmp_path / "val")
    assert s.label == 65 and s.size == (500, 250)  # n01751748 = sea snake = 65
    assert s.boxes == [(100, 50, 300, 200), (0, 0, 10, 20)]
    assert s.path == tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"
    (tmp_path / "xml" / "b.xml").write_text(XML.replace("n01751748", "n99999999"))
    with pytest.raises(ValueError, match="not an ImageNet-1k wnid"):
        data.read_voc_xml(tmp_path / "xml", tmp_path / "val")


def test_wsol_metadata_reader(tmp_path):
    (tmp_path / "image_ids.txt").write_text("val/a.JPEG\nval/b.JPEG\n")
    (tmp_path / "class_labels.txt").write_text("val/a.JPEG,3\nval/b.JPEG,999\n")
    (tmp_path / "image_sizes.txt").write_text("val/a.JPEG,640,480\nval/b.JPEG,100,200\n")
    (tmp_path / "localization.txt").write_text("val/a.JPEG,1,2,30,40\nval/a.JPEG,5,5,6,6\nval/b.JPEG,0,0,99,199\n")
    a, b = data.read_wsol_metadata(tmp_path, tmp_path)
    assert (a.label, a.size, a.boxes) == (3, (640, 480), [(1, 2, 30, 40), (5, 5, 6, 6)])
    assert (b.label, b.boxes) == (999, [(0, 0, 99, 199)])
    with pytest.raises(FileNotFoundError, match="metadata file missing"):
        data.read_wsol_metadata(tmp_path, tmp_path, prefix="x_")


def test_resize_box_truncates_like_wsolevaluation():
    assert data.resize_box((100, 50, 300, 200), (500, 250), (224, 224)) == (44, 44, 134, 179)


def test_localization_dataset_rescales_boxes(tmp_path):
    Image.fromarray(np.zeros((250, 500, 3), np.uint8)).save(tmp_path / "a.jpg")
    s = data.LocSample(tmp_path / "a.jpg", 1, (500, 250), [(100, 50, 300, 200)])
    x, label, boxes = data.LocalizationDataset([s], size=224)[0]
    assert x.shape == (3, 224, 224) and label == 1 and boxes.tolist() == [[44, 44, 134, 179]]


def test_imagenet_train_labels_follow_the_wnid(tmp_path):
    for wnid in ("n02102040", "n01440764"):  # springer (217), tench (0): folder order != index order
        (tmp_path / wnid).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / wnid / f"{i}.JPEG")
    ds = data.ImageNetTrain(tmp_path, lambda im: torch.zeros(1), per_class=2)
    assert len(ds) == 4 and ds.classes == [0, 217]
    assert [label for _, label in ds.samples] == [0, 0, 217, 217]
    assert data.imagenet_wnids()[217] == "n02102040" and len(data.imagenet_wnids()) == 1000


def test_shared_data_all_three_forms_agree():
    """The shared val set in CSV and XML form, and the ILSVRC metadata restricted to it, give the
    same labels and (after rescaling to 224) boxes within a pixel."""
    root = data_dir()
    csv_samples = data.find_localization_samples(root / "imagenette")
    assert len(csv_samples) == 250
    xml_samples = {s.path.name: s for s in data.read_voc_xml(root / "imagenette" / "val_boxes_xml",
                                                               root / "imagenette" / "val")}
    meta = {s.path.name: s for s in data.read_wsol_metadata(root / "imagenet", root / "imagenet",
                                                            prefix="ilsvrc2012_val_")}
    for s in csv_samples[:40]:
        x, m = xml_samples[s.path.name], meta[s.path.name]
        assert s.label == x.label == m.label
        a = [data.resize_box(b, s.size, (224, 224)) for b in s.boxes]
        c = [data.resize_box(b, m.size, (224, 224)) for b in m.boxes]
        assert len(a) == len(c) and np.abs(np.array(a) - np.array(c)).max() <= 1


def test_rank_shard_decodes_only_its_own_items():
    from chip_ext.data import RankShard

    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.decoded = []

        def __len__(self):
            return 7

        def __getitem__(self, i):
            self.decoded.append(i)
            return torch.full((3, 2, 2), float(i + 1)), i

    base = Counting()
    shard = RankShard(base, rank=1, world=3)
    items = [shard[i] for i in range(len(shard))]
    assert len(shard) == 7
    assert sorted(set(base.decoded)) == [1, 4]  # its own items only
    for i, (x, label) in enumerate(items):
        if i % 3 == 1:
            assert label == i and torch.equal(x, torch.full((3, 2, 2), float(i + 1)))
        else:
            assert x.shape == (3, 2, 2) and not x.any()  # a placeholder distill never uses
    with pytest.raises(ValueError, match=r"rank must be in \[0, world=2\); got 2"):
        RankShard(base, rank=2, world=2)


def test_rank_slice_holds_only_its_own_items_with_their_global_indices():
    from chip_ext.data import RankSlice

    base = [torch.full((3, 2, 2), float(i)) for i in range(7)]
    shares = [RankSlice(base, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 2, 2]
    assert [float(s[j][0, 0, 0]) for s in shares for j in range(len(s))] == [0, 3, 6, 1, 4, 2, 5]
    assert [shares[1].global_index(j) for j in range(2)] == [1, 4]
    with pytest.raises(IndexError, match=r"index 2 is out of range: rank 1 of 3 holds 2 of the 7 items"):
        shares[1][2]
    with pytest.raises(ValueError, match=r"got rank=3, world=3"):
        RankSlice(base, 3, 3)
    with pytest.raises(TypeError, match=r"world must be an int; got 2.0"):
        RankSlice(base, 0, 2.0)
    with pytest.raises(TypeError, match=r"map-style dataset\); got a generator"):
        RankSlice((x for x in base), 0, 2)
    assert len(RankSlice(base[:1], 2, 3)) == 0  # more ranks than images: an empty share


def test_squash_preprocess_and_localization_dataset_see_the_same_pixels(tmp_path):
    """Issue 14.8: evaluation squashed images bilinearly while distillation resized, cropped and used the
    model's interpolation. distill --squash and LocalizationDataset(interpolation=...) agree exactly."""
    import numpy as np
    from PIL import Image

    from chip_ext import data
    from chip_ext.models import Preprocess

    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(path)
    pre = Preprocess(size=32, resize=36, interpolation="bicubic", squash=True)
    with Image.open(path) as img:
        seen_by_distill = pre.display(img)
    sample = data.LocSample(path, 3, (80, 50), [(10.0, 5.0, 40.0, 45.0)])
    seen_by_evaluate, _, boxes = data.LocalizationDataset([sample], size=32, interpolation="bicubic")[0]
    assert torch.equal(seen_by_distill, seen_by_evaluate) and seen_by_distill.shape == (3, 32, 32)
    crop = Preprocess(size=32, resize=36, interpolation="bicubic")
    with Image.open(path) as img:
        assert not torch.equal(crop.display(img), seen_by_evaluate)
    assert pre.describe()["geometry"] == "squash 32" and crop.describe()["geometry"] == "resize 36, centre-crop 32"
