"""The `chip-ext` command."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    import chip_ext

    info = chip_ext.build_info()
    info["chip_ext_version"] = chip_ext.__version__
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("chip_ext", info["chip_ext_version"]),
        ("built with torch", info["torch_version"]),
        ("running torch", info["running_torch"]),
        ("CPU kernels", "parallel (OpenMP)" if info["openmp"] else "single-threaded (built without OpenMP)"),
        ("CUDA kernels", "yes" if info["with_cuda"] else "no (CPU kernels only)"),
        ("built with CUDA", info["cuda_version"] or "-"),
        ("CUDA archs", info["cuda_archs"] or "-"),
        ("GPU visible", f"yes ({info['gpu_name']})" if info["gpu_visible"] else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chip-ext", description="CHIP channel-wise explanations for CNNs")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how chip_ext was built and what this machine can run")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
