"""One rank of a torch.distributed (gloo) distillation, started by tests/test_distributed.py.

    python dist_worker.py '{"rank": 0, "world": 2, "port": 1234, "out": "/tmp/x", ...}'

Options (JSON): N (perturbations, 6), n_images (22), checkpoint (a path), shard (shard_accumulators),
fit_intercept (distill's),
timeout (seconds of the process group, 60), batch (distill's batch_size), die_after (this rank SIGKILLs itself when the loader is
asked for that item), idle (this rank joins the group but never calls distill; it waits for
another rank's .err file, then leaves), rank_slice (each rank a DataLoader over its RankSlice, batches of
loader_batch = 4; die_at: SIGKILL when that global image is read; fail_at: an OSError there), max_images (distill's).
"""
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chip_ext  # noqa: E402
from test_distillation import InvariantCNN, TIGHT  # noqa: E402


def images(n, die_after=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 10, 10, generator=g)
    for item, i in enumerate(range(0, n, 4)):
        if item == die_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-run: no cleanup, no exception
        yield x[i:i + 4]


class Images:
    """The same images as a map-style dataset, for per-rank loaders (RankSlice); die_at: SIGKILL when asked
    for that global image."""

    def __init__(self, n, die_at=None, fail_at=None):
        self.x = torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(0))
        self.die_at, self.fail_at = die_at, fail_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if i == self.fail_at:
            raise OSError(f"image {i} is corrupt")
        return self.x[i]


def loader_of(opt, rank, world):
    if not opt.get("rank_slice"):
        return images(opt.get("n_images", 22), opt.get("die_after"))
    from torch.utils.data import DataLoader

    from chip_ext.data import RankSlice

    return DataLoader(RankSlice(Images(opt.get("n_images", 22), opt.get("die_at"), opt.get("fail_at")), rank, world),
                      batch_size=opt.get("loader_batch", 4))


def main():
    opt = json.loads(sys.argv[1])
    rank, world, out = opt["rank"], opt["world"], Path(opt["out"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{opt['port']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=opt.get("timeout", 60)))
    try:
        if opt.get("idle"):
            while not any(out.glob("*.err")):
                time.sleep(0.2)
            return
        imp = chip_ext.distill(InvariantCNN(), loader_of(opt, rank, world),
                               ["conv1", "relu2"], num_perturbations=opt.get("N", 6), progress=False,
                               checkpoint=opt.get("checkpoint"), checkpoint_every=0,
                               max_images=opt.get("max_images"),
                               shard_accumulators=opt.get("shard", False), batch_size=opt.get("batch"),
                               **({"fit_intercept": opt["fit_intercept"]} if "fit_intercept" in opt else {}),
                               **TIGHT)  # left out: distill's default, as in the single-process reference
        torch.save({k: v for k, v in imp.weights.items()} | {"meta": imp.meta, "intercepts": imp.intercepts},
                   out / f"rank{rank}.pt")
        dist.barrier()  # nobody tears the group down while another rank still uses it
    except Exception as err:  # noqa: BLE001
        (out / f"rank{rank}.err").write_text(f"{type(err).__name__}: {err}")
        raise SystemExit(3)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
