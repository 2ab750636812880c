"""One rank of a torch.distributed (gloo) distillation, started by tests/test_distributed.py.

    python dist_worker.py RANK WORLD PORT OUT [num_perturbations] [n_images]
"""
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chip_ext  # noqa: E402
from test_distillation import InvariantCNN, TIGHT  # noqa: E402


def images(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 10, 10, generator=g)
    return [x[i:i + 4] for i in range(0, n, 4)]


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    N = int(sys.argv[5]) if len(sys.argv) > 5 else 6
    n = int(sys.argv[6]) if len(sys.argv) > 6 else 22
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        imp = chip_ext.distill(InvariantCNN(), images(n), ["conv1", "relu2"], num_perturbations=N,
                               progress=False, **TIGHT)
        torch.save({k: v for k, v in imp.weights.items()} | {"seen": imp.meta["images_seen"]},
                   out / f"rank{rank}.pt")
        dist.barrier()  # nobody tears the group down while another rank still uses it
    except Exception as err:  # noqa: BLE001
        (out / f"rank{rank}.err").write_text(f"{type(err).__name__}: {err}")
        raise SystemExit(3)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
