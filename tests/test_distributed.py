"""distill under torch.distributed (gloo, CPU): several processes give the single-process W."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chip_ext
from test_distillation import TIGHT, InvariantCNN

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, out, Ns=None, n_images=22):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), port, str(out),
                               str((Ns or [6] * world)[r]), str(n_images)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    codes = []
    for p in procs:
        try:
            p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("a rank hung")
        codes.append(p.returncode)
    return codes


def single(n_images=22, N=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_images, 3, 10, 10, generator=g)
    return chip_ext.distill(InvariantCNN(), [x[i:i + 4] for i in range(0, n_images, 4)], ["conv1", "relu2"],
                            num_perturbations=N, progress=False, **TIGHT)


@pytest.mark.parametrize("world", [2, 3])  # 22 images: not divisible by 3, uneven tail batch of 2
def test_ranks_give_the_single_process_result(world, tmp_path):
    assert launch(world, tmp_path) == [0] * world, [p.read_text() for p in tmp_path.glob("*.err")]
    ref = single()
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["seen"] == 22  # every image once, over all ranks
        for layer in ("conv1", "relu2"):
            torch.testing.assert_close(got[layer].double(), ref.weights[layer].double(), rtol=0, atol=1e-10)


def test_mismatched_ranks_fail_fast_on_every_rank(tmp_path):
    codes = launch(2, tmp_path, Ns=[6, 7])
    assert codes == [3, 3]
    for r in range(2):
        msg = (tmp_path / f"rank{r}.err").read_text()
        assert "ranks disagree on ['num_perturbations']" in msg and "rank 1: [7]" in msg


def test_torchrun_cli_equals_single_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m chip_ext distill` on an ImageFolder gives the 1-process file."""
    import numpy as np
    from PIL import Image

    for wnid in ("n01440764", "n02102040"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(5):
            rng = np.random.default_rng(hash((wnid, i)) % 2**32)
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "train" / wnid / f"{i}.png")
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\nfrom chip_ext.models import Preprocess\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(6, 1000)), Preprocess(size=32, resize=36)\n")
    common = ["distill", "--model", f"{tmp_path / 'm.py'}:build", "--data", str(tmp_path / "train"),
              "--layers", "1", "--perturbations", "5", "--batch-size", "3", "--workers", "0", "--quiet"]
    r = subprocess.run([sys.executable, "-m", "chip_ext", *common, "--out", str(tmp_path / "one.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "chip_ext", *common, "--out", str(tmp_path / "two.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines()
                                        if any(k in l for k in ("Error", "error", "what()", "terminate", "Signal")))[-4000:]
    one, two = chip_ext.Importance.load(tmp_path / "one.pt"), chip_ext.Importance.load(tmp_path / "two.pt")
    assert one.classes == two.classes == [0, 217] and two.meta["images_seen"] == 10
    # float32 network, batches composed differently per rank: equal up to float32 rounding
    torch.testing.assert_close(two.weights["1"], one.weights["1"], rtol=1e-4, atol=1e-5)
