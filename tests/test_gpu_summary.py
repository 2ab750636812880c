"""The GPU scripts, checked on the CPU: benchmarks/gpu/gpu_summary.py reads whatever a device run wrote (files
found by their content, not their names; a missing file or ceiling said as such, never as nan), and
bench_imagenet_scale.py's dry run measures every term of its projection."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ROOT / "benchmarks" / "results" / "h200-2026-11-27"


def summary(folder: Path) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "gpu_summary.py"), str(folder)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_archived_run_is_read_whole_under_any_names(tmp_path):
    for i, f in enumerate(sorted(ARCHIVE.glob("*.json"))):
        shutil.copy(f, tmp_path / f"step{i}_rerun.json")  # names the summary has never seen
    shutil.copy(ARCHIVE / "ceilings.txt", tmp_path / "gpu_ceilings_rerun.txt")
    out = summary(tmp_path)
    missing = [line for line in out.splitlines() if "no file" in line]
    assert "nan" not in out and "MISSING" not in out
    assert len(missing) == 1 and missing[0].startswith("imagenet_scale "), missing  # that run had no such step
    assert "787 TFLOP/s" in out and "gate_pool K=512" in out and "admm_lasso C=1000" in out
    assert out.count("vgg16 features.29 bf16 autocast") == 3  # every bench_distill file, not one
    assert "1752.3 img/s" in out and "12% of bf16 matmul" in out and "explain, ms per image" in out


def test_missing_files_and_ceilings_are_said(tmp_path):
    shutil.copy(ARCHIVE / "bench_distill_2_512_images.json", tmp_path / "x.json")
    (tmp_path / "broken.json").write_text("{not json")
    out = summary(tmp_path)
    assert "nan" not in out
    for kind in ("gpu_vs_cpu", "bench_ops", "bench_solver", "explain_speed"):
        assert f"{kind}" in out and "no file" in out
    assert "not measured" in out and "unknown (no ceiling)" in out and "1752.3 img/s" in out


def test_imagenet_scale_dry_run_measures_every_term(tmp_path):
    """bench_imagenet_scale.py runs end to end on the CPU at tiny sizes (the GPU run uses the same code)."""
    import json
    import os

    from shared_data import data_dir

    data = data_dir()
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed" / "bench_imagenet_scale.py"), "--dry-run", "--out",
                        str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CHIP_EXT_DATA": str(data)})
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    (run,) = record["results"]
    assert record["dry_run"] and run["images"] == 48
    for key in ("loader_images_per_s", "end_to_end_images_per_s", "startup_s", "solve_s", "projection_1gpu_s"):
        assert run[key] > 0, key
    assert run["projection_1gpu_s"] > 1_281_167 / run["end_to_end_images_per_s"]
    assert run["paper_8gpu"]["final_reduce_bytes"] == 10 * (512 * 513 // 2 + 2 * 512 + 3) * 8
    shutil.copy(out, tmp_path / "any_name.json")  # the summary finds it by content and says it is a dry run
    (tmp_path / "scale.json").unlink()
    lines = [line for line in summary(tmp_path).splitlines() if line.startswith("imagenet_scale: resnet18 layer4")]
    assert len(lines) == 2 and all("(dry run)" in line for line in lines), lines
    assert " min" in lines[0] and "end to end" in lines[0]
