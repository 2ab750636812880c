"""The short table gpu_check.sh prints last: each goal of the GPU work against what was measured.

    python benchmarks/gpu/gpu_summary.py OUT_DIR      # reads the JSON and text files gpu_check.sh wrote
Files are found by what they hold, not by name: every *.json in OUT_DIR is sorted by its "benchmark"
field (a rerun's `_rerun` file, the `_512` run, files renamed when archived all count), the newest file
of each kind (by modification time, then name) is summarised, and every bench_distill file is listed.
The ceilings come from any *ceilings*.txt. A kind with no file is reported as "no file" (a step that
failed or was not run), a goal whose ceiling was not measured as "unknown"; nothing is filled in.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ceilings(path: Path) -> dict[str, float]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            out[key] = float(value)
    except (OSError, ValueError):
        pass
    return out


def by_kind(d: Path) -> dict[str, list[tuple[Path, dict]]]:
    """{benchmark name: [(path, record), ...] oldest first} for every readable JSON record in d."""
    found: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(d.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        record = load(path)
        if isinstance(record, dict) and isinstance(record.get("benchmark"), str):
            found.setdefault(record["benchmark"], []).append((path, record))
    return found


def all_ceilings(d: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for path in sorted(d.glob("*ceilings*.txt"), key=lambda p: (p.stat().st_mtime, p.name)):
        out.update(ceilings(path))  # the newest file's values win
    return out


def _value(x: float | None, fmt: str, unit: str) -> str:
    return "not measured" if x is None else f"{x:{fmt}} {unit}"


def main(out_dir: str) -> int:
    d = Path(out_dir)
    if not d.is_dir():
        print(f"gpu_summary: {d} is not a folder")
        return 2
    rows: list[tuple[str, str, str]] = []
    kinds = by_kind(d)

    def newest(kind: str):
        files = kinds.get(kind)
        return files[-1][1] if files else None

    ceil = all_ceilings(d)
    rows.append(("copy bandwidth (ceiling)", _value(ceil.get("copy_TBps"), ".2f", "TB/s"), ""))
    rows.append(("bf16 matmul (ceiling)", _value(ceil.get("matmul_bfloat16_TFLOPs"), ".0f", "TFLOP/s"), ""))
    rows.append(("fp32 matmul (ceiling)", _value(ceil.get("matmul_float32_TFLOPs"), ".0f", "TFLOP/s"), ""))
    cmp = newest("gpu_vs_cpu")
    if cmp is None:
        rows.append(("gpu_vs_cpu", "no file", ""))
    else:
        for name, r in cmp["runs"].items():
            if name == "cpu":
                continue
            rows.append((f"W {name} vs cpu ({cmp['layer']}, {cmp['images']} images)",
                         f"rel {r['W_rel_frobenius']:.1e}, max {r['W_max_abs_diff_over_max_abs']:.1e}, "
                         f"{r['sign_flips']} sign / {r['support_changes']} support flips",
                         f"maps max |d| {r['map_max_abs_diff']:.1e}" if "map_max_abs_diff" in r else ""))
    ops = newest("bench_ops")
    if ops is None:
        rows.append(("bench_ops", "no file", ""))
    else:
        for r in ops["results"]:
            s = r["shape"]
            if r["op"] == "gate_pool":  # the goal is against writing the copies alone (runs before it: copy)
                ceiling = "write-only" if "fraction_of_write_only" in r else "copy"
                frac = r.get("fraction_of_write_only", r["fraction_of_copy_bandwidth"])
                rows.append((f"gate_pool K={s['K']} {s['H']}x{s['W']} B={s['B']} {r['dtype'][6:]}",
                             f"{r['impls']['chip_ext.gate_pool']['GB_per_s']:.0f} GB/s = {frac:.0%} of {ceiling}",
                             "goal >= 80%: " + ("met" if frac >= 0.8 else "NOT met")))
            elif r["op"] == "gram_accumulate":
                frac = r["fraction_of_fp32_gemm"]
                err = max(r["rel_error_vs_float64"].values())
                rows.append((f"gram_accumulate K={s['K']} C={s['C']} B={s['B']}",
                             f"{r['impls']['chip_ext.gram_accumulate']['GFLOP_per_s']:.0f} GFLOP/s = {frac:.0%} "
                             f"of fp32 GEMM; err {err:.0e}", "goal >= 50%: " + ("met" if frac >= 0.5 else "NOT met")))
            elif r["op"] == "sample_gates":
                ref = r["impls"].get("pytorch_ops_reference")  # runs before the kernel have none
                rows.append((f"sample_gates K={s['K']} N={s['N']}",
                             f"{r['impls']['chip_ext.sample_gates']['ms_per_image']:.3f} ms/image"
                             + (f" (PyTorch ops {ref['ms_per_image']:.3f})" if ref else ""), ""))
    sol = newest("bench_solver")
    if sol is None or "synthetic" not in sol:
        rows.append(("bench_solver", "no file" if sol is None else "no synthetic run in the file", ""))
    else:
        syn = sol["synthetic"]
        c, runs = syn["config"], syn["solvers"]
        new, old = runs["admm_lasso (default: adaptive rho + polishing)"], runs["v0.1 fixed rho"]
        rows.append((f"admm_lasso C={c['classes']} K={c['channels']}",
                     f"{new['seconds']:.2f} s (v0.1 fixed rho {old['seconds']:.2f} s); {syn['speedup_vs_resolve']:.1f}x "
                     f"vs re-solve, {syn['speedup_vs_sklearn']:.0f}x vs sklearn (CPU)",
                     f"converged {new['converged']}/{new['classes']}"))
    distills = kinds.get("bench_distill", [])
    if not distills:
        rows.append(("bench_distill", "no file", ""))
    bf16 = ceil.get("matmul_bfloat16_TFLOPs")
    for path, dis in distills:
        for r in dis["results"]:
            for label, run in r["chip_ext"].items():
                frac = run["useful_TFLOP_per_s"] / bf16 if bf16 else None
                goal = ""
                if r["layer"] == "features.29" and "bf16" in label:
                    goal = "goal >= 40% of bf16: " + ("unknown (no ceiling)" if frac is None else
                                                      "met" if frac >= 0.4 else "NOT met")
                share = "" if frac is None else f" = {frac:.0%} of bf16 matmul"
                rows.append((f"{path.stem}: {r['model']} {r['layer']} {label}",
                             f"{run['images_per_s']:.1f} img/s, {run['useful_TFLOP_per_s']:.1f} TFLOP/s{share}", goal))
            sp = r["speedup_vs_naive"]
            rows.append((f"{path.stem}: {r['model']} {r['layer']} vs naive", f"{sp:.1f}x",
                         ("goal >= 50x: " + ("met" if sp >= 50 else "NOT met")) if r["layer"] == "features.29" else ""))
    scale = newest("imagenet_scale")
    if scale is None:
        rows.append(("imagenet_scale", "no file", ""))
    else:
        real = not scale.get("dry_run") and scale.get("device", "cpu") != "cpu"
        for r in scale["results"]:
            one, eight = r["projection_1gpu_s"] / 60, r["paper_8gpu"]["projection_s"] / 60
            tag = f"imagenet_scale: {r['model']} {r['layer']} decode={r['decode']}"
            rows.append((tag, f"loader {r['loader_images_per_s']:.0f} img/s, end to end "
                              f"{r['end_to_end_images_per_s']:.0f} img/s, start-up {r['startup_s']:.1f} s, "
                              f"solve {r['solve_s']:.1f} s -> {one:.1f} min",
                         ("goal < 10 min on one GPU: " + ("met" if one < 10 else "NOT met")) if real else "(dry run)"))
            rows.append((f"{tag}, 8 GPUs on paper", f"{eight:.2f} min",
                         ("goal < 1 min: " + ("met" if eight < 1 else "NOT met")) if real else "(dry run)"))
    exp = newest("explain_speed")
    if exp is None:
        rows.append(("explain_speed", "no file", ""))
    else:
        rows.append((f"explain, ms per image ({exp['model']}, batch {exp['batch']})",
                     ", ".join(f"{m} {r['ms_per_image']:.2f}" for m, r in exp["methods"].items()), ""))
    width = max(len(r[0]) for r in rows)
    print("\n=== summary")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:<60} {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
