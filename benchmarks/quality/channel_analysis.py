"""Channel analysis like the paper's IV-E on a distilled Importance: two similar classes and one
dissimilar one (picked by the cosine similarity of their importance vectors), their top-10 channel
overlaps and the overlaps of the channels above a thousandth of each class's maximum; printed,
drawn (chip_ext.render) and written to JSON.

    python benchmarks/quality/channel_analysis.py IMPORTANCE.pt [--layer L] [--out-dir benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import torch

from chip_ext import Importance, render


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("importance", type=Path)
    p.add_argument("--layer", default=None)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = p.parse_args(argv)
    imp = Importance.load(args.importance)
    layer = args.layer or imp.layers[-1]
    W = imp.weights[layer].double()
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = Wn @ Wn.T
    C = len(imp.classes)
    a, b = max(combinations(range(C), 2), key=lambda ij: float(cos[ij]))
    c = min((i for i in range(C) if i not in (a, b)), key=lambda i: float(cos[a, i] + cos[b, i]))
    chosen = [imp.classes[i] for i in (a, b, c)]
    label = {imp.classes[i]: (imp.class_names[i] if imp.class_names else str(imp.classes[i])) for i in (a, b, c)}
    top = render.top_channel_overlap(imp, chosen, k=args.k, layer=layer)
    above = {cl: set(torch.nonzero(W[imp.row(cl)] > W[imp.row(cl)].max() / 1000).flatten().tolist()) for cl in chosen}
    above_overlap = [[len(above[x] & above[y]) for y in chosen] for x in chosen]
    report = {"layer": layer, "classes": {str(k): v for k, v in label.items()},
              "cosine": {f"{label[chosen[0]]} ~ {label[chosen[1]]}": float(cos[a, b]),
                         f"{label[chosen[0]]} ~ {label[chosen[2]]}": float(cos[a, c]),
                         f"{label[chosen[1]]} ~ {label[chosen[2]]}": float(cos[b, c])},
              f"top{args.k}": top, "above_max_over_1000": {"sizes": [len(above[x]) for x in chosen],
                                                          "overlap": above_overlap}}
    print(f"layer {layer}; similar: {label[chosen[0]]!r} and {label[chosen[1]]!r} (cos {float(cos[a, b]):.2f}); "
          f"dissimilar: {label[chosen[2]]!r}")
    print(f"top-{args.k} overlaps (rows/cols in that order): {top['overlap']}")
    print(f"channels above max/1000: sizes {report['above_max_over_1000']['sizes']}, overlaps {above_overlap}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    render.plot_top_channel_overlap(imp, chosen, args.out_dir / "channel_overlap.png", k=args.k, layer=layer)
    render.plot_channel_importance(imp, args.out_dir / "channel_importance.png", layer=layer)
    (args.out_dir / "channel_analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out_dir}/channel_overlap.png, channel_importance.png, channel_analysis.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
