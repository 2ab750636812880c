"""Why CHIP's channel ranking trails gradient x activation at early layers: how correlated the pooled
channels are that each class's Lasso must tell apart, and how many channels it keeps.

From the sums of the "channels" pass of quality_common.py (EfficientNet-Lite0, 100 Imagenette train
images a class, N=32): per class the loyalty- and proximity-weighted covariance of the pooled gated
features, Σ f h z zᵀ / Σ f h − z̄ z̄ᵀ, turned into correlations; per layer the mean |correlation| between
distinct channels, the share of channel pairs with |r| > 0.5, the mean number of other channels a channel
correlates with above 0.5, and the non-zero weights of W per class (distill's defaults).

    python benchmarks/quality/channel_correlation.py          # seconds, from the cached pass
Writes benchmarks/results/channel_correlation.json.
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402

from chip_ext.distillation.checkpoints import read_checkpoint  # noqa: E402
from chip_ext.kernels.packing import unpack_triu  # noqa: E402


def main() -> int:
    model, _ = qc.load_model()
    imp = qc.solve(model, "channels", lam_ratio=0.03, fit_intercept=True)
    keys = ("layers", "classes", "num_perturbations", "sigma", "max_drop", "target", "seed", "model", "gates",
            "autocast", "shard_accumulators")
    state = read_checkpoint(qc.WORK / "channels.ckpt", {k: imp.meta[k] for k in keys})
    out = {"benchmark": "channel_correlation", "date": dt.date.today().isoformat(), "model": qc.MODEL,
           "pass": "channels", "layers": {}}
    for layer, s in state["layers"].items():
        G, _, _, n, zs, _ = s["acc"]
        K = zs.shape[1]
        mean_abs, strong, partners = [], [], []
        for c in range(G.shape[0]):
            m = zs[c] / n[c]
            cov = unpack_triu(G[c], K) / n[c] - torch.outer(m, m)
            sd = cov.diagonal().clamp_min(1e-30).sqrt()
            r = cov / torch.outer(sd, sd)
            off = ~torch.eye(K, dtype=torch.bool)
            a = r[off].abs()
            mean_abs.append(float(a.mean()))
            strong.append(float((a > 0.5).double().mean()))
            partners.append(float(((r.abs() > 0.5) & off).sum(dim=1).double().mean()))
        W = imp.weights[layer]
        nonzero = (W != 0).sum(dim=1).double()
        out["layers"][layer] = {"K": K, "mean_abs_correlation": sum(mean_abs) / len(mean_abs),
                                "share_pairs_abs_r_over_0.5": sum(strong) / len(strong),
                                "partners_abs_r_over_0.5": sum(partners) / len(partners),
                                "nonzero_weights_per_class": float(nonzero.mean()),
                                "nonzero_weights_min_max": [int(nonzero.min()), int(nonzero.max())]}
        L = out["layers"][layer]
        print(f"{layer} K={K}: mean |r| {L['mean_abs_correlation']:.3f}, pairs |r|>0.5 "
              f"{100 * L['share_pairs_abs_r_over_0.5']:.1f}%, partners {L['partners_abs_r_over_0.5']:.1f}, "
              f"non-zero W {L['nonzero_weights_per_class']:.1f} {L['nonzero_weights_min_max']}", flush=True)
    path = qc.RESULTS / "channel_correlation.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
