"""Copy a finished comparison's tables and report into a results folder, under a header that says how,
where and when it was made (command, machine, date, versions).

Usage: python benchmarks/collect.py --comparison runs/bench/X --results benchmarks/results/X --command "..."
       [--label "CIFAR-10 (JPEG q75)"]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import autoprune
from autoprune.io.files import write_text, write_with

COPIED = ("compare.json", "compare.md", "report.html", "accuracy_macs.png", "channels.png", "search.png")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path) -> str:
    """The checked-out commit (read-only query), or 'unknown'."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header(summary: dict, command: str, label: str | None, root: Path) -> str:
    """The results README's header."""
    try:
        import torch_pruning as tp
        tp_version = getattr(tp, "__version__", "unknown")
    except ImportError:
        tp_version = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none used (CPU only)"
    invocation = summary.get("invocation") or {}
    dataset = label or summary.get("dataset")
    limit = invocation.get("limit")
    lines = [
        f"# {summary.get('title') or 'autoprune comparison'}",
        "",
        f"- Data: {dataset}" + (f" (**--limit {limit}**: a subset, not the full data set)" if limit else ""),
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {cpu_model()}, {os.cpu_count()} logical cores; GPU: {gpu}; "
        f"{platform.system()} {platform.release()}",
        f"- Latency measured on: {summary.get('latency_device') or 'n/a'}",
        f"- Versions: autoprune {autoprune.__version__} (commit {git_commit(root)}), torch {torch.__version__}, "
        f"torch-pruning {tp_version}, Python {platform.python_version()}",
        f"- Wall time of the comparison: {summary.get('seconds', 0) / 60:.1f} min"
        + ("" if summary.get("complete") else " (**incomplete**)"),
        "",
        "Files: `compare.md` / `compare.json` (the table), `report.html` (self-contained: table and figures), "
        "`accuracy_macs.png`, `channels.png`, `search.png`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparison", required=True, help="the `autoprune compare --out` directory")
    parser.add_argument("--results", required=True, help="folder to write the results into")
    parser.add_argument("--command", required=True, help="the command that made the comparison")
    parser.add_argument("--label", help="data set label for the header, e.g. 'CIFAR-10 (JPEG q75)'")
    args = parser.parse_args(argv)
    src, dst = Path(args.comparison), Path(args.results)
    summary_path = src / "compare.json"
    if not summary_path.exists():
        sys.stderr.write(f"collect: {summary_path} does not exist; did the comparison run?\n")
        return 1
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    dst.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (src / name).exists():
            write_with(dst / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))
    table = (src / "compare.md").read_text(encoding="utf-8").split("\n", 1)[1]  # without its own heading
    root = Path(__file__).resolve().parent.parent
    write_text(dst / "README.md", header(summary, args.command, args.label, root) + table)
    print(f"results written to {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
