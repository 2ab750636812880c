"""Sanity checks (Adebayo et al. 2018): do the maps change when the model's weights are randomised?

Cascading model-parameter randomisation of EfficientNet-Lite0 from the classifier down to the stem
(`chip_ext.evaluation.sanity`), on 16 Imagenette val images of the evaluation half (every 8th, fixed
before any result). At each stage every method's maps of the true class are compared with the trained
model's maps of the same images: Spearman rank correlation (with and without absolute values) and SSIM,
each the mean over images with a 95% bootstrap interval. CHIP twice: `W` kept from the trained model
(the importance is a fixed lookup, so only the activations change), and re-distilled on the randomised
model at every stage (the fair test of a method that learns from the model). With Quantus installed,
its MPRT on Grad-CAM is run beside ours with the same draws (a cross-check of the code).

    python benchmarks/quality/sanity_checks.py       # results/sanity_checks.json, .png; docs/sanity_checks.png
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402

import chip_ext  # noqa: E402
from chip_ext import data, models  # noqa: E402
from chip_ext.evaluation import sanity, stats  # noqa: E402
from chip_ext.explanation import baselines  # noqa: E402
from chip_ext.explanation.image_chip import region_chip  # noqa: E402
from chip_ext.explanation.maps import normalize_maps  # noqa: E402

CAM_LAYER = "bn2"
MID = "blocks.5"
FUSED = ["blocks.4", "blocks.5", "blocks.6", "bn2"]
SHOWN_STAGES = ["classifier", "conv_head", "blocks.6", "blocks.5", "blocks.4", "blocks.3", "blocks.2",
                "blocks.1", "blocks.0", "conv_stem"]


def distil(model, per_class: int, perturbations: int):
    """CHIP at the fused layers from `per_class` Imagenette train images a class (distill's defaults)."""
    pre = models.load(qc.MODEL)[1]
    ds = data.ImageNetTrain(qc.DATA / "imagenette" / "train", pre, per_class=per_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return chip_ext.distill(model, DataLoader(ds, batch_size=16), FUSED, num_perturbations=perturbations,
                                classes=ds.classes, progress=False)


def all_maps(model, x, t, imp_kept, imp_new) -> dict[str, torch.Tensor]:
    """Every method's maps of the images x for classes t on `model` ([B, H, W], or [B, 3, H, W] for the
    guided methods: raw gradients x a map)."""
    ex = chip_ext.explain
    with warnings.catch_warnings():  # W kept from the trained model: the fingerprint warning is the point
        warnings.simplefilter("ignore")
        out = {
            "gradcam": baselines.gradcam(model, x, CAM_LAYER, t),
            "gradcam (blocks.5)": baselines.gradcam(model, x, MID, t),
            "guided_backprop": baselines.guided_backprop(model, x, t),
            "guided_gradcam": baselines.guided_gradcam(model, x, CAM_LAYER, t),
            "chip (W kept)": ex(model, x, imp_kept, layer=CAM_LAYER, target=t),
            "chip blocks.5 (W kept)": ex(model, x, imp_kept, layer=MID, target=t),
            "guided_chip (W kept)": ex(model, x, imp_kept, method="guided_chip", layer=CAM_LAYER, target=t),
            "refined (W kept)": ex(model, x, imp_kept, method="refined", target=t),
            "fused (W kept)": ex(model, x, imp_kept, method="fused", target=t),
            "region_chip (blocks.5)": region_chip(model, x, MID, t),
        }
        if imp_new is not None:
            out["chip (re-distilled)"] = ex(model, x, imp_new, layer=CAM_LAYER, target=t)
            out["chip blocks.5 (re-distilled)"] = ex(model, x, imp_new, layer=MID, target=t)
            out["fused (re-distilled)"] = ex(model, x, imp_new, method="fused", target=t)
            out["guided_chip (re-distilled)"] = ex(model, x, imp_new, method="guided_chip", layer=CAM_LAYER,
                                                   target=t)
    return {k: v.detach().float() for k, v in out.items()}


def compare(trained: dict, now: dict) -> dict:
    out = {}
    for name, ref in trained.items():
        if name not in now:
            continue
        rho = sanity.rank_correlation(ref, now[name])
        rho_abs = sanity.rank_correlation(ref, now[name], absolute=True)
        ss = sanity.ssim(ref, now[name])
        out[name] = {"spearman": stats.bootstrap_interval(rho), "spearman_abs": stats.bootstrap_interval(rho_abs),
                     "ssim": stats.bootstrap_interval(ss)}
    return out


def quantus_cross_check(model, x, t) -> dict | None:
    """Quantus's MPRT (top-down, Spearman of |maps|) on our Grad-CAM at bn2 against our cascade with
    Quantus's layer list and draws: the largest difference of any per-image correlation."""
    try:
        import quantus
    except ImportError:
        return None

    def explain_func(model, inputs, targets, **kw):
        xs = torch.as_tensor(inputs)
        return baselines.gradcam(model, xs, CAM_LAYER, torch.as_tensor(targets)).unsqueeze(1).numpy()

    metric = quantus.MPRT(layer_order="top_down", seed=42, abs=True, normalise=True, disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=None, explain_func=explain_func,
                    device="cpu", batch_size=len(x))
    layers = [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")][::-1]
    original = baselines.gradcam(model, x, CAM_LAYER, t)
    diffs = []
    for name, randomized in sanity.cascading_randomization(model, layers, seed=43, seed_step=0):
        mine = sanity.rank_correlation(original, baselines.gradcam(randomized, x, CAM_LAYER, t), absolute=True)
        diffs.append(float(np.nanmax(np.abs(mine - np.asarray(theirs[name])))))
    return {"quantus": quantus.__version__, "method": f"gradcam at {CAM_LAYER}", "images": len(x),
            "layers": len(layers), "max_abs_difference_of_correlations": max(diffs)}


def picture(record: dict, maps: dict, x01: torch.Tensor, path: Path, image: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(maps["trained"])
    cols = ["trained"] + [s for s in SHOWN_STAGES if s in maps]
    fig, axes = plt.subplots(len(names), len(cols) + 1, figsize=(1.25 * (len(cols) + 1), 1.3 * len(names)))
    for r, name in enumerate(names):
        axes[r, 0].imshow(x01[image].permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        for c, stage in enumerate(cols):
            m = maps[stage][name][image]
            guided = m.dim() == 3  # raw gradients x a map: |.| summed over colours, in grey (Adebayo's way)
            m = m.abs().sum(0) if guided else m
            axes[r, c + 1].imshow(normalize_maps(m[None])[0].numpy(), cmap="gray" if guided else "jet")
            if r == 0:
                axes[r, c + 1].set_title("trained" if stage == "trained" else f"→{stage}", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Cascading randomisation of EfficientNet-Lite0 (top down); a map that stays the same does "
                 f"not depend on the weights ({record['date']}, {record['machine']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=66)  # a page picture: small enough for the repository


def curves(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(record["stages"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, title in ((axes[0], "spearman_abs", "Spearman |maps| with the trained model's"),
                           (axes[1], "ssim", "SSIM with the trained model's")):
        for i, name in enumerate(record["stages"][stages[0]]):
            ys = [record["stages"][s][name][key]["mean"] for s in stages]
            lo = [record["stages"][s][name][key]["lo"] for s in stages]
            hi = [record["stages"][s][name][key]["hi"] for s in stages]
            ours = "chip" in name
            line, = ax.plot(range(len(stages)), ys, "-o" if ours else "--.", lw=2 if ours else 1.2, label=name,
                            color=plt.get_cmap("tab20")(i % 20))
            ax.fill_between(range(len(stages)), lo, hi, color=line.get_color(), alpha=0.12)
        ax.set_xticks(range(len(stages)), stages, rotation=40, fontsize=8)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Randomised from the classifier down; 16 Imagenette val images; 95% bootstrap intervals "
                 f"({record['date']}, {record['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(record: dict, key: str = "spearman_abs") -> str:
    """The sanity table: per method and stage (randomised from the classifier down to it), the mean
    similarity to the trained model's maps."""
    stages = list(record["stages"])
    names = list(record["stages"][stages[0]])
    lines = ["| method | " + " | ".join(f"→`{s}`" for s in stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{record['stages'][s][n][key]['mean']:.2f}" for s in stages) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--per-class", type=int, default=10, help="train images a class for each distillation (10)")
    p.add_argument("--perturbations", type=int, default=32)
    p.add_argument("--no-redistill", action="store_true")
    p.add_argument("--out", type=Path, default=qc.RESULTS / "sanity_checks.json")
    p.add_argument("--picture", type=Path, default=qc.ROOT.parent / "docs" / "sanity_checks.png")
    p.add_argument("--table", action="store_true", help="print the tables from --out and stop")
    args = p.parse_args(argv)
    if args.table:
        record = json.loads(args.out.read_text())
        for key in ("spearman_abs", "spearman", "ssim"):
            print(f"\n{key}\n" + markdown(record, key))
        return 0
    t0 = time.perf_counter()
    model, pre = qc.load_model()
    val = qc.val_dataset(pre)
    _, ev = qc.halves(len(val))
    idx = ev[:: max(1, len(ev) // args.images)][: args.images]
    x01, t, _ = next(iter(DataLoader(Subset(val, idx), batch_size=len(idx), collate_fn=data.collate_localization)))
    x = pre.normalize(x01)
    imp_kept = distil(model, args.per_class, args.perturbations)
    trained = all_maps(model, x, t, imp_kept, None if args.no_redistill else imp_kept)
    record = {"benchmark": "sanity_checks", "date": dt.date.today().isoformat(),
              "machine": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
              "model": qc.MODEL, "images": idx, "cam_layer": CAM_LAYER, "fused_layers": FUSED,
              "distill": {"per_class": args.per_class, "num_perturbations": args.perturbations, "layers": FUSED},
              "protocol": "cascading randomisation (reset_parameters, top down); maps of the true class compared "
                          "with the trained model's on the same images", "stages": {}}
    kept = {"trained": {k: v for k, v in trained.items()}}
    for stage, randomized in sanity.cascading_randomization(model):
        if stage not in SHOWN_STAGES:
            continue
        s0 = time.perf_counter()
        imp_new = None if args.no_redistill else distil(randomized, args.per_class, args.perturbations)
        now = all_maps(randomized, x, t, imp_kept, imp_new)
        kept[stage] = now
        record["stages"][stage] = compare(trained, now)
        print(f"== {stage} ({time.perf_counter() - s0:.0f} s)", flush=True)
        for name, r in record["stages"][stage].items():
            print(f"   {name:<30} spearman|.| {stats.format_interval(r['spearman_abs'])}  "
                  f"ssim {stats.format_interval(r['ssim'])}", flush=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    record["quantus_cross_check"] = quantus_cross_check(model, x[:4], t[:4])
    print("quantus:", record["quantus_cross_check"])
    record["seconds"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    curves(record, args.out.with_suffix(".png"))
    picture(record, kept, x01, args.picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
