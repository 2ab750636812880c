"""The channel atlas as an HTML page: per class, its top channels (by CHIP's effect) with their crops;
per channel, its crops and the classes that rely on it; the channels most classes share; the class pairs
that share the most top channels. Pictures are PNG crops of the receptive field of each kept peak.
"""
from __future__ import annotations

import html
from collections import Counter
from itertools import combinations
from pathlib import Path

import torch

from ..importance import Importance
from .atlas import Atlas, ReceptiveField

THUMB = 72  # crop thumbnails, pixels


def _crop(display_image: torch.Tensor, box: tuple[int, int, int, int], size: int = THUMB):
    """A PIL thumbnail of display_image (Tensor[3, H, W] in [0, 1]) inside box (x0, y0, x1, y1)."""
    from PIL import Image

    x0, y0, x1, y1 = box
    patch = (display_image[:, y0:y1, x0:x1].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(patch).resize((size, size), Image.BICUBIC)


def channel_summary(imp: Importance, layer: str, k: int = 5) -> dict:
    """Per class (row) its top-k channels by effect; per channel the classes that rely on it (positive and
    negative effect among each class's top-k by |effect|); the most shared channels; class pairs by shared
    top channels."""
    by = "effect" if imp.feature_means is not None else "weight"
    score = imp.effect(layer) if by == "effect" else imp.weights[layer]
    names = imp.class_names or [str(c) for c in imp.classes]
    repeated = {n for n in names if names.count(n) > 1}  # ImageNet names two classes 'crane'
    names = [f"{n} ({c})" if n in repeated else n for n, c in zip(names, imp.classes)]
    top = {r: imp.top_channels(imp.classes[r], k, layer, by=by)[0].tolist() for r in range(len(imp.classes))}
    users: dict[int, dict[str, list]] = {}
    strongest = torch.topk(score.abs(), min(k, score.shape[1]), dim=1).indices
    for r in range(len(imp.classes)):
        for ch in strongest[r].tolist():
            sign = "positive" if float(score[r, ch]) > 0 else "negative"
            users.setdefault(ch, {"positive": [], "negative": []})[sign].append(names[r])
    shared = Counter(ch for chs in top.values() for ch in chs)
    pairs = sorted(((len(set(top[a]) & set(top[b])), names[a], names[b], sorted(set(top[a]) & set(top[b])))
                    for a, b in combinations(range(len(imp.classes)), 2)), key=lambda t: (-t[0], t[1], t[2]))
    return {"by": by, "top": {names[r]: chs for r, chs in top.items()},
            "values": {names[r]: [float(score[r, c]) for c in chs] for r, chs in top.items()},
            "users": users, "most_shared": shared.most_common(20), "pairs": [p for p in pairs if p[0] > 0][:30]}


def write_report(out: Path, book: Atlas, field: ReceptiveField, imp: Importance, dataset, *, k: int = 5,
                 max_classes: int = 50, title: str = "") -> Path:
    """out/index.html and out/crops/*.png. dataset[i] -> (display image Tensor[3, H, W] in [0, 1], ...)
    for the atlas's image indices (the loader order of the atlas pass)."""
    out = Path(out)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    layer = book.layer
    summary = channel_summary(imp, layer, k)
    names = list(summary["top"])[:max_classes]
    shown_channels = sorted({ch for n in names for ch in summary["top"][n]} | {ch for ch, _ in summary["most_shared"]})
    cache: dict[int, torch.Tensor] = {}

    def crops_of(ch: int) -> list[str]:
        files = []
        for j in range(book.top):
            i = int(book.images[ch, j])
            if i < 0:
                continue
            path = out / "crops" / f"c{ch}_{j}.png"
            if not path.exists():
                if i not in cache:
                    if len(cache) > 256:  # bounded: an image is needed by a few channels at most
                        cache.clear()
                    cache[i] = dataset[i][0]
                _crop(cache[i], book.crop_box(ch, j, field)).save(path)
            files.append(f"crops/{path.name}")
        return files

    crops = {ch: crops_of(ch) for ch in shown_channels}
    e = html.escape

    def strip(ch: int) -> str:
        return "".join(f'<img src="{f}" width="{THUMB}" height="{THUMB}" alt="channel {ch}">' for f in crops[ch])

    parts = [f"<h1>{e(title or 'Channel atlas')}: layer {e(layer)}</h1>",
             f"<p>{book.K} channels; per channel the {book.top} images of {book.images_seen} whose map peaks highest, "
             f"cropped around the peak to its effective receptive field ({field.size[0]}×{field.size[1]} input "
             f"pixels: {e(field.how)}; every pixel with a non-zero gradient spans "
             f"{field.support[0] if field.support else '?'}×{field.support[1] if field.support else '?'}). "
             f"Channels ranked per class by CHIP's {e(summary['by'])}"
             + (" (W · mean pooled feature: what switching the channel off does)" if summary["by"] == "effect" else "")
             + ".</p>", "<h2>Classes and their top channels</h2>"]
    for n in names:
        rows = "".join(f'<div class="ch"><b>channel {ch}</b> <span>{v:+.3g}</span><br>{strip(ch)}</div>'
                       for ch, v in zip(summary["top"][n], summary["values"][n]))
        parts.append(f'<section class="cls"><h3>{e(n)}</h3>{rows}</section>')
    parts.append("<h2>Channels shared by most classes</h2>")
    for ch, count in summary["most_shared"][:10]:
        users = summary["users"].get(ch, {"positive": [], "negative": []})
        parts.append(f'<div class="ch"><b>channel {ch}</b>: in the top {k} of {count} classes; relied on by '
                     f'{e(", ".join(users["positive"][:12])) or "-"}; against: {e(", ".join(users["negative"][:12])) or "-"}'
                     f"<br>{strip(ch)}</div>")
    parts.append("<h2>Class pairs sharing top channels</h2><table><tr><th>shared</th><th>classes</th><th>channels</th></tr>")
    for count, a, b, chs in summary["pairs"][:20]:
        parts.append(f"<tr><td>{count}</td><td>{e(a)} – {e(b)}</td><td>{', '.join(map(str, chs))}</td></tr>")
    parts.append("</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>chip_ext channel atlas</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto}img{margin:1px;image-rendering:auto}"
            ".cls{border-top:1px solid #ccc;padding:4px 0}.ch{display:inline-block;margin:4px 12px 4px 0;"
            "vertical-align:top}td,th{padding:2px 8px;text-align:left}</style></head><body>"
            + "\n".join(parts) +
            "<script>window.addEventListener('load',()=>{const b=[...document.images].filter(i=>!i.complete||"
            "i.naturalWidth===0).length;document.body.setAttribute('data-images',document.images.length);"
            "document.body.setAttribute('data-broken-images',b);});</script></body></html>\n")
    (out / "index.html").write_text(page)
    return out / "index.html"
