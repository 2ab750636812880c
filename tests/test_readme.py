"""The README's runnable examples run as written and give what the README says they give."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def runnable_blocks() -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "# runnable as-is" in b]


def run_block(code: str, tmp_path) -> dict:
    namespace: dict = {}
    exec(compile(code.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), namespace)
    return namespace


def test_runnable_readme_blocks(tmp_path, monkeypatch, capsys):
    blocks = runnable_blocks()
    assert len(blocks) >= 3, "the README lost a block marked '# runnable as-is'"
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
