"""chip_ext.channels: class-selective ablation on a planted network whose causal channels are known,
and the rankings other methods give."""
import numpy as np
import pytest
import torch
from torch import nn

import chip_ext
import chip_ext.data
import chip_ext.models
from chip_ext import channels


class BlockHead(nn.Module):
    """The layer 'act' is ReLU of the 12-channel input; class c's logit is 3 × the pooled mean of its four
    channels S_c = {4c, ..., 4c + 3}, and channel 12 (always active, all classes' weight 0.1) is shared.
    So switching off S_c is what removes class c, and nothing else is."""

    def __init__(self, C=3):
        super().__init__()
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * C + 1, C, bias=False)
        W = torch.zeros(C, 4 * C + 1)
        for c in range(C):
            W[c, 4 * c:4 * c + 4] = 3.0
        W[:, -1] = 0.1
        with torch.no_grad():
            self.fc.weight.copy_(W)

    def forward(self, x):
        return self.fc(self.act(x).mean(dim=(2, 3)))


def class_images(n_per_class=8, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(C):
        x = 0.1 * torch.rand(n_per_class, 4 * C + 1, 6, 6, generator=g)
        x[:, 4 * c:4 * c + 4] += 0.6 + 0.3 * torch.rand(n_per_class, 4, 6, 6, generator=g)
        x[:, -1] += 1.0
        xs.append(x)
        ys += [c] * n_per_class
    return torch.cat(xs), torch.tensor(ys)


def planted_scores(C=3):
    s = torch.zeros(C, 4 * C + 1)
    for c in range(C):
        s[c, 4 * c:4 * c + 4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    return s


def test_the_causal_channels_are_selective_and_random_ones_are_not():
    model = BlockHead().eval()
    x, y = class_images()
    truth = channels.ablation(model, x, y, "act", planted_scores(), [0, 1, 2], ks=(1, 4))
    sel = truth.selectivity()
    assert truth.base_hit.all() and sel[1] > 0.5 and sel[1] > sel[0] > 0  # all four: the class is gone
    assert truth.own_hit[:, 1].mean() < 0.1 and np.nanmax(truth.off[:, 1]) <= 1e-6  # others only gain
    g = torch.Generator().manual_seed(3)
    noise = [channels.ablation(model, x, y, "act", torch.rand(3, 13, generator=g), [0, 1, 2], ks=(4,)).selectivity()[0]
             for _ in range(5)]
    assert float(np.mean(noise)) < 0.5 * sel[1]
    shared = torch.zeros(3, 13)
    shared[:, -1] = 1.0  # the channel every class uses a little: removing it is not class-selective
    assert abs(channels.ablation(model, x, y, "act", shared, [0, 1, 2], ks=(1,)).selectivity()[0]) < 0.05


def test_sufficiency_and_the_mean_fill():
    model = BlockHead().eval()
    x, y = class_images()
    kept = channels.ablation(model, x, y, "act", planted_scores(), [0, 1, 2], ks=(4,), keep=True)
    assert np.nanmax(np.abs(kept.own[:, 0])) < 0.05 and kept.own_hit.all()  # S_c alone keeps the class
    wrong = torch.roll(planted_scores(), 1, dims=0)  # each class ranked by another class's channels
    assert channels.ablation(model, x, y, "act", wrong, [0, 1, 2], ks=(4,), keep=True).own[:, 0].mean() > 0.3
    mean_fill = channels.ablation(model, x, y, "act", planted_scores(), [0, 1, 2], ks=(4,), mode="mean")
    zero_fill = channels.ablation(model, x, y, "act", planted_scores(), [0, 1, 2], ks=(4,))
    assert 0 < mean_fill.selectivity()[0] < zero_fill.selectivity()[0]  # the mean keeps a third of each class


def test_chip_and_the_gradient_rankings_recover_the_planted_channels():
    model = BlockHead().eval()
    x, y = class_images(n_per_class=12)
    imp = chip_ext.distill(model, [x[:18], x[18:]], "act", num_perturbations=48, lam_ratio=0.01, progress=False)
    sources = channels.rankings(model, [(x[:18], y[:18]), (x[18:], y[18:])], "act", [0, 1, 2], importance=imp)
    assert set(sources) == {"chip_weight", "chip_effect", "taylor", "gradcam", "activation", "pooled_taylor",
                            "classifier"}
    for name in ("chip_effect", "chip_weight", "taylor", "classifier"):
        top = channels.top_k(sources[name], 4)
        for c in range(3):
            assert set(top[c].tolist()) == set(range(4 * c, 4 * c + 4)), (name, c, top[c])
    stats = channels.gradient_statistics(model, [(x, y)], "act", [0, 1, 2])
    assert stats["count"].tolist() == [12.0, 12.0, 12.0]
    # gradcam's weight of channel k for class c is fc[c, k] / (h w): the planted weights over 36 positions
    torch.testing.assert_close(stats["gradcam"], model.fc.weight.detach() / 36)
    torch.testing.assert_close(stats["activation"][0], x[:12].mean(dim=(0, 2, 3)))
    # pooled Taylor: h·w · mean grad · mean activation per image, averaged; the head is linear in the pooled
    # map, so it equals the full Taylor here (where the activation sits does not matter to a mean)
    torch.testing.assert_close(stats["pooled_taylor"], stats["taylor"], rtol=1e-5, atol=1e-6)


def test_bootstrap_interval_and_bad_arguments():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    r = channels.bootstrap_interval(v, boot=500)
    assert r["mean"] == 2.5 and 1.0 <= r["lo"] < 2.5 < r["hi"] <= 4.0
    d = channels.bootstrap_interval(v, v - 1, boot=200)
    assert d["mean"] == d["lo"] == d["hi"] == 1.0  # a paired difference over the same resampled images
    model = BlockHead().eval()
    x, y = class_images(2)
    with pytest.raises(ValueError, match=r"scores must be Tensor\[C, K\] with C=3"):
        channels.ablation(model, x, y, "act", torch.zeros(2, 13), [0, 1, 2])
    with pytest.raises(ValueError, match=r"ks must be channel counts between 1 and K=13; got \[0\]"):
        channels.ablation(model, x, y, "act", planted_scores(), [0, 1, 2], ks=(0,))
    with pytest.raises(ValueError, match="mode must be one of"):
        channels.ablation(model, x, y, "act", planted_scores(), [0, 1, 2], mode="blur")
    with pytest.raises(ValueError, match=r"labels must be Tensor\[B\] with B=6"):
        channels.ablation(model, x, y[:3], "act", planted_scores(), [0, 1, 2])


# ------------------------------------------------------------------------------------- the atlas

def test_the_atlas_keeps_exactly_the_top_positions(tmp_path):
    """Against a full sort of every image's peak per channel on a small set; ties keep the earlier image."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(5, 2)).eval()
    x = torch.randn(23, 3, 8, 6)
    x[7] = x[3]  # a tie: image 3 must come before image 7
    book = channels.atlas(model, [x[:5], x[5:6], x[6:17], x[17:]], "1", top=4, progress=False)
    with torch.no_grad():
        A = model[1](model[0](x))
    peak, where = A.flatten(2).max(dim=2)  # [23, 5]
    for k in range(5):
        order = sorted(range(23), key=lambda i: (-float(peak[i, k]), i))[:4]
        assert book.images[k].tolist() == order
        assert torch.equal(book.values[k], peak[order, k])
        assert book.positions[k].tolist() == [[int(where[i, k]) // 6, int(where[i, k]) % 6] for i in order]
    assert book.images_seen == 23 and book.map_size == (8, 6) and book.input_size == (8, 6)
    assert (book.images == 3).any() and 3 in book.images[(book.images == 7).any(1)].flatten().tolist()
    book.save(tmp_path / "atlas.pt")
    back = channels.Atlas.load(tmp_path / "atlas.pt")
    assert torch.equal(back.values, book.values) and torch.equal(back.positions, book.positions)
    assert torch.load(tmp_path / "atlas.pt", weights_only=True)["format"] == "chip_ext.channels.Atlas"


def test_fewer_images_than_top_leave_empty_slots():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    book = channels.atlas(model.eval(), [torch.randn(3, 3, 4, 4)], "1", top=5, progress=False)
    assert (book.images[:, 3:] == -1).all() and torch.isinf(book.values[:, 3:]).all()
    with pytest.raises(ValueError, match="top must be an int >= 1"):
        channels.atlas(model, [torch.randn(1, 3, 4, 4)], "1", top=0)


def test_crops_match_the_receptive_field_of_a_known_geometry():
    """conv 3x3 (stride 1) -> conv 3x3 stride 2 -> conv 3x3: receptive field 3 + 2 + 2·2 = 9 pixels, stride 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 2)).double().eval()
    field = channels.receptive_field(model, "5", (32, 32), mass=1.0)
    assert field.size == field.support == (9, 9) and field.stride == (2.0, 2.0) and field.how == "gradient support"
    effective = channels.receptive_field(model, "5", (32, 32))  # half of the gradient's magnitude
    assert effective.support == (9, 9) and effective.size[0] <= 9 and effective.size[0] % 2 == 1
    assert effective.how == "gradient, 50% of its magnitude" and effective.size[0] < 9
    # position (r, c) of the 16 x 16 map is centred on input pixel (2r, 2c): box [2r - 4, 2r + 5)
    assert field.box(8, 5) == (10 - 4, 16 - 4, 10 + 5, 16 + 5)
    assert field.box(0, 0) == (0, 0, 5, 5)  # clipped at the border
    assert field.box(15, 15) == (26, 26, 32, 32)
    book = channels.atlas(model, [torch.randn(2, 3, 32, 32, dtype=torch.float64)], "5", top=2, progress=False)
    r, c = book.positions[0, 0].tolist()
    assert book.crop_box(0, 0, field) == field.box(r, c)


# ------------------------------------------------------------------------------------- chip-ext channels

def _cli_setup(tmp_path):
    import subprocess  # noqa: F401
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_cli import MODEL_FILE, image_folder

    spec = tmp_path / "tiny_model.py"
    spec.write_text(MODEL_FILE)
    model, pre = chip_ext.models.load(f"{spec}:build")
    train = image_folder(tmp_path / "data", n=6)
    ds = chip_ext.data.ImageNetTrain(train, pre)
    imp = chip_ext.distill(model, torch.utils.data.DataLoader(ds, batch_size=3), ["3"], num_perturbations=4,
                           classes=[0, 1, 2, 3], class_names=["zero", "one", "two", "three"], progress=False)
    imp.save(tmp_path / "imp.pt")
    return spec, train


def _run(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "chip_ext", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_channels_cli_writes_a_report_that_renders(tmp_path):
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from shared_data import under_ci

    spec, train = _cli_setup(tmp_path)
    out = tmp_path / "atlas"
    r = _run("channels", "--model", f"{spec}:build", "--importance", tmp_path / "imp.pt", "--data", train,
             "--layer", "3", "--top", "3", "--k", "2", "--workers", "0", "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    book = channels.Atlas.load(out / "atlas.pt")
    assert book.K == 16 and book.images_seen == 6 and book.meta["receptive_field"]["support"] == [5, 5]
    page = (out / "index.html").read_text()
    links = re.findall(r'<img src="([^"]+)"', page)
    assert links and all((out / link).is_file() for link in links)
    assert "zero" in page and "Channels shared by most classes" in page
    if shutil.which("chromium") is None:
        if under_ci():
            pytest.fail("chromium is not installed under CI (.ci/run installs the Debian package chromium)")
        pytest.skip("chromium not installed (Debian package chromium)")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["bash", str(root / "benchmarks" / "demo_browser_check.sh"), str(out),
                        str(tmp_path / "shot.png")], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0 and f"images: {len(links)}, broken: 0" in r.stdout, r.stdout + r.stderr


def test_channels_cli_bad_inputs_are_one_line(tmp_path):
    spec, train = _cli_setup(tmp_path)
    other = tmp_path / "other.py"
    other.write_text((tmp_path / "tiny_model.py").read_text().replace("manual_seed(0)", "manual_seed(1)"))
    empty = tmp_path / "empty" / "n02123045"
    empty.mkdir(parents=True)
    common = ["--importance", tmp_path / "imp.pt", "--workers", "0", "--quiet", "--out", tmp_path / "o"]
    cases = [
        (["--model", f"{spec}:build", "--data", train, "--layer", "1"], "--layer: the importance has no layer '1'"),
        (["--model", f"{other}:build", "--data", train, "--layer", "3"], "was distilled on other weights"),
        (["--model", f"{spec}:build", "--data", empty.parent, "--layer", "3"], "no images found under"),
    ]
    for args, message in cases:
        r = _run("channels", *args, *common)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr


class _SkipBlock(nn.Module):
    """timm's residual pattern: the branch, then `x = branch + shortcut` behind `has_skip`."""

    def __init__(self, K):
        super().__init__()
        self.conv = nn.Conv2d(K, K, 1, bias=False)
        self.act = nn.ReLU()
        self.has_skip = True

    def forward(self, x):
        shortcut = x
        x = self.act(self.conv(x))
        if self.has_skip:
            x = x + shortcut
        return x


class _StemBlockHead(nn.Module):
    """BlockHead behind a stem convolution (LRP's first layer gets the flat rule, so the planted head must
    not be the first layer) and a residual block."""

    def __init__(self, C=3):
        super().__init__()
        K = 4 * C + 1
        self.stem = nn.Conv2d(K, K, 1, bias=False)
        self.block = _SkipBlock(K)
        self.head = BlockHead(C)
        with torch.no_grad():
            self.stem.weight.copy_(torch.eye(K)[:, :, None, None])
            self.block.conv.weight.copy_(0.05 * torch.rand(K, K, 1, 1, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_crp_ranking_recovers_the_planted_channels():
    pytest.importorskip("crp")
    model = _StemBlockHead().eval()
    x, y = class_images(n_per_class=6)
    got = channels.crp_relevance(model, [(x[:9], y[:9]), (x[9:], y[9:])], ["block", "stem"], [0, 1, 2])
    assert set(got) == {"block", "stem"} and got["block"].shape == (3, 13)
    for c in range(3):
        assert set(channels.top_k(got["block"], 4)[c].tolist()) == set(range(4 * c, 4 * c + 4))
    one = channels.crp_relevance(model, [(x, y)], "block", [0, 1, 2])
    torch.testing.assert_close(one, got["block"])
    with pytest.raises(ValueError, match="layers must name modules"):
        channels.crp_relevance(model, [(x, y)], "nope", [0, 1, 2])


def test_skip_sum_canonizer_conserves_relevance_through_the_addition():
    pytest.importorskip("crp")
    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlusFlat

    from chip_ext.channels.crp import default_composite

    model = _StemBlockHead().eval()
    x, y = class_images(n_per_class=1)
    before = model(x)

    def block_in_and_out(composite):
        res = CondAttribution(model)(x.clone().requires_grad_(True), [{"y": [int(c)]} for c in y], composite,
                                     record_layer=["stem", "block"])
        return res.relevances["stem"].sum(dim=(1, 2, 3)), res.relevances["block"].sum(dim=(1, 2, 3))

    into, out = block_in_and_out(default_composite())
    torch.testing.assert_close(into, out, rtol=1e-3, atol=1e-4)  # conserved: no bias, ε tiny
    into_plain, out_plain = block_in_and_out(EpsilonPlusFlat())
    assert (into_plain > 1.5 * out_plain).all()  # both summands get all of it without the canonizer
    assert not hasattr(model.block, "canonizer_sum") and model.block.has_skip
    torch.testing.assert_close(model(x), before)  # the model is as it was


def test_conditional_maps_split_the_class_map_by_channel():
    model = BlockHead().eval()
    x, y = class_images(n_per_class=4)
    imp = chip_ext.distill(model, [x], "act", num_perturbations=32, lam_ratio=0.01, progress=False)
    images = x[::4]  # one image a class; 'act' keeps the input's 6 x 6 size
    parts = channels.conditional_maps(model, images, imp, "act", k=4)
    assert parts.maps.shape == (3, 4, 6, 6) and parts.channels.shape == (3, 4)
    assert parts.targets.tolist() == [0, 1, 2]  # the top-1 prediction of each image
    A = torch.relu(images)
    for b, c in enumerate(parts.targets.tolist()):
        assert set(parts.channels[b].tolist()) == set(range(4 * c, 4 * c + 4))  # the planted channels
        for j, ch in enumerate(parts.channels[b].tolist()):
            W = imp.weights["act"][imp.row(c), ch]
            torch.testing.assert_close(parts.maps[b, j], W * A[b, ch])
            assert parts.weights[b, j] == W
    every = channels.conditional_maps(model, images, imp, "act", target=1, k=13)
    assert every.targets.tolist() == [1, 1, 1]
    torch.testing.assert_close(every.maps.sum(dim=1), every.class_maps, rtol=1e-5, atol=1e-6)
    from chip_ext.maps import normalize_maps
    torch.testing.assert_close(normalize_maps(torch.relu(every.class_maps)),
                               chip_ext.explain(model, images, imp, layer="act", target=1))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 13\]"):
        channels.conditional_maps(model, images, imp, "act", k=14)
    with pytest.raises(ValueError, match="not in the importance"):
        channels.conditional_maps(model, images, imp, "fc", k=1)
