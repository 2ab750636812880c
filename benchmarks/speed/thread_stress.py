"""Thread safety under load: chip_ext called from many threads on fresh models while the user's own
forward runs in another thread.

Each repetition starts `--threads` worker threads; each makes `--calls` first-time calls on a fresh
copy of a ResNet-18 (a new model object each call, so every call traces the model anew),
alternating `chip_ext.explain` (CHIP at layer4) and a tiny `chip_ext.distill` (2 images, N=4,
classes 0-1). A user thread runs forwards of another model in a loop for the whole repetition.
Every result must equal the single-threaded one exactly (maps, W), every user forward must
succeed and equal its single-threaded output, and afterwards `torch.nn.Module.__call__` and
`__getattr__` must be torch's own again (a trace that leaves them patched breaks the process).

    python benchmarks/speed/thread_stress.py                       # the issue's size: 8 x 50, 20 repetitions
    python benchmarks/speed/thread_stress.py --threads 4 --calls 4 --repetitions 2   # the test suite's size

Writes benchmarks/results/thread_stress-<device>.json (counts of failures and mismatches, first
errors seen, wall time).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision

import chip_ext

RESULTS = Path(__file__).resolve().parents[1] / "results"
ORIGINAL_CALL = torch.nn.Module.__call__
ORIGINAL_GETATTR = torch.nn.Module.__getattr__
# the tiny distillation is underdetermined on purpose (it only has to be the same in every thread)
warnings.filterwarnings("ignore", message=".*the Lasso is underdetermined")


def setup(size: int = 32):
    """The base model, images, an Importance at layer4, the user's model and input, and the
    single-threaded references."""
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(2, 3, size, size)
    imp = chip_ext.Importance({"layer4": torch.randn(10, 512)}, list(range(10)))
    user_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    user_x = torch.randn(8, 16)
    ref = {
        "explain": chip_ext.explain(copy.deepcopy(base), images, imp, layer="layer4", target=3),
        "distill": distill_once(copy.deepcopy(base), images).weights["layer4"],
    }
    with torch.no_grad():
        user_ref = user_model(user_x)
    return base, images, imp, user_model, user_x, ref, user_ref


def distill_once(model, images):
    return chip_ext.distill(model, [images], "layer4", classes=[0, 1], num_perturbations=4, progress=False)


def run_repetition(threads: int, calls: int, state) -> dict:
    base, images, imp, user_model, user_x, ref, user_ref = state
    errors: list[str] = []
    failed = [0]
    mismatches: list[str] = []
    stop = threading.Event()
    user = {"forwards": 0, "failures": 0, "mismatches": 0}
    lock = threading.Lock()

    def user_loop():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    out = user_model(user_x)
                ok = torch.equal(out, user_ref)
                with lock:
                    user["forwards"] += 1
                    user["mismatches"] += not ok
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    user["forwards"] += 1
                    user["failures"] += 1
                    if len(errors) < 20:
                        errors.append(f"user forward: {type(err).__name__}: {err}")

    def worker(w: int):
        for i in range(calls):
            kind = "explain" if (w + i) % 2 == 0 else "distill"
            try:
                model = copy.deepcopy(base)  # a fresh model: its first call traces it
                if kind == "explain":
                    got = chip_ext.explain(model, images, imp, layer="layer4", target=3)
                else:
                    got = distill_once(model, images).weights["layer4"]
                if not torch.equal(got, ref[kind]):
                    with lock:
                        mismatches.append(f"thread {w} call {i} {kind}: max diff "
                                          f"{(got - ref[kind]).abs().max().item():.3g}")
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    failed[0] += 1
                    if len(errors) < 20:
                        errors.append(f"thread {w} call {i} {kind}: {type(err).__name__}: {err}\n"
                                      + traceback.format_exc(limit=3))

    user_thread = threading.Thread(target=user_loop)
    user_thread.start()
    workers = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    t0 = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    seconds = time.perf_counter() - t0
    stop.set()
    user_thread.join()
    patched = torch.nn.Module.__call__ is not ORIGINAL_CALL or torch.nn.Module.__getattr__ is not ORIGINAL_GETATTR
    try:  # a plain forward in the main thread afterwards
        torch.nn.Linear(3, 2)(torch.zeros(1, 3))
        after = None
    except Exception as err:  # noqa: BLE001
        after = f"{type(err).__name__}: {err}"
    return {"call_failures": failed[0], "errors": errors[:5],
            "result_mismatches": len(mismatches), "mismatches": mismatches[:5], "user": user,
            "module_methods_left_patched": patched, "main_thread_forward_after": after,
            "seconds": round(seconds, 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repetitions", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON file (default results/thread_stress-cpu.json)")
    args = p.parse_args(argv)
    state = setup()
    reps = []
    for r in range(args.repetitions):
        rep = run_repetition(args.threads, args.calls, state)
        reps.append(rep)
        print(f"repetition {r}: {rep['call_failures']} failed calls, {rep['result_mismatches']} mismatches, "
              f"user forwards {rep['user']['forwards']} ({rep['user']['failures']} failed), "
              f"patched after: {rep['module_methods_left_patched']}, {rep['seconds']} s", flush=True)
        if rep["errors"]:
            print("  first error:", rep["errors"][0].splitlines()[0], flush=True)
        if rep["module_methods_left_patched"]:
            break  # the process is broken from here on
    summary = {
        "threads": args.threads, "calls_per_thread": args.calls, "repetitions": len(reps),
        "calls": args.threads * args.calls * len(reps),
        "failed_calls": sum(r["call_failures"] for r in reps),
        "result_mismatches": sum(r["result_mismatches"] for r in reps),
        "user_forwards": sum(r["user"]["forwards"] for r in reps),
        "user_failures": sum(r["user"]["failures"] + r["user"]["mismatches"] for r in reps),
        "left_patched": any(r["module_methods_left_patched"] for r in reps),
        "main_thread_broken": any(r["main_thread_forward_after"] for r in reps),
    }
    result = {"benchmark": "thread_stress", "date": dt.date.today().isoformat(),
              "device": "cpu", "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
              "summary": summary, "repetitions": reps}
    out = Path(args.out) if args.out else RESULTS / "thread_stress-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    res = main()
    s = res["summary"]
    sys.exit(0 if not (s["failed_calls"] or s["result_mismatches"] or s["user_failures"] or s["left_patched"]
                       or s["main_thread_broken"]) else 1)
