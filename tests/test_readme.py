"""The README's and the docs' runnable examples run as written and give what the pages say they give;
every relative link and picture in them points at a file that exists."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def runnable_blocks() -> list[str]:
    return [b for page in PAGES for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
            if "# runnable as-is" in b]


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 250  # the user's manual; the rest is in docs/


def run_block(code: str, tmp_path) -> dict:
    namespace: dict = {}
    exec(compile(code.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), namespace)
    return namespace


def test_runnable_readme_blocks(tmp_path, monkeypatch, capsys):
    blocks = runnable_blocks()
    assert len(blocks) >= 3, "the pages lost a block marked '# runnable as-is'"
    monkeypatch.chdir(tmp_path)
    checked = set()
    for code in blocks:
        ns = run_block(code, tmp_path)
        printed = capsys.readouterr().out
        if "chip_ext.distill(model, images" in code:  # the Distill example
            imp = ns["imp"]
            assert "Importance(3 classes; layer1: [3, 64], layer4: [3, 512])" in printed
            assert ns["W"].shape == (3, 512) and len(ns["channels"]) == 5
            assert (tmp_path / "chip_resnet18.pt").is_file()
            assert imp.layers == ["layer1", "layer4"]
            checked.add("distill")
        if "chip_ext.explain(model, images, imp" in code:  # the Explain example
            for name in ("chip", "refined", "gcam", "cam"):
                m = ns[name]
                assert m.shape == (2, 64, 64) and float(m.min()) >= 0 and float(m.max()) <= 1
            assert ns["guided"].shape == (2, 3, 64, 64)
            for png in ("chip_grid.png", "chip_channels.png", "chip_overlap.png"):
                assert (tmp_path / png).stat().st_size > 1000
            checked.add("explain")
        if "admm_lasso(G, b, 1e-6" in code:  # the solver example
            W, info = ns["W"], ns["info"]
            torch.testing.assert_close(W[0, :5], torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0], dtype=torch.float64),
                                       rtol=0, atol=1e-4)
            assert abs(float(info.intercept[0]) - 0.7) < 1e-3 and bool(info.converged.all())
            assert bool((ns["W_pos"] >= 0).all())
            checked.add("solver")
    assert checked == {"distill", "explain", "solver"}
