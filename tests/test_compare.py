"""`autoprune compare`: one table, figures and a self-contained HTML page for several methods; resume.

One real comparison (a LeNet-5 trained for one epoch on synthetic data; l1, slim, random with tiny
budgets and no fine-tuning; slim fails on LeNet-5, which has no BatchNorm) serves most tests; resume
and interruption replace :func:`autoprune.api.execute` (one method's run) by a recording fake, and the
table's best marks are checked on hand-made rows.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import trained_base

from autoprune import cli
from autoprune.engine.prune import SearchInterrupted
from autoprune.engine.result import PruneResult
from autoprune.errors import AutopruneError
from autoprune.report.plots import running_max
from autoprune.runs.compare import (
    best_methods,
    check_options,
    columns,
    comparison_table,
    markdown,
    options_for,
    parse_methods,
    terminal_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("accuracy_macs.png", "accuracy_latency.png", "channels.png", "search.png")
FAST = ["--dataset", "synthetic", "--macs-reduction", "0.5", "--budget", "3", "--finetune-epochs", "0",
        "--threads", "1", "--latency-batch", "4", "--latency-repeats", "2", "--quiet"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr). Restores the SIGINT and SIGTERM handlers."""
    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def restore_subnormals():
    """Training sets flush-to-zero process-wide (autoprune.engine.train); leave the process as this module found it."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """LeNet-5 trained for one epoch on the synthetic data (shared with the other CLI tests)."""
    return trained_base(tmp_path_factory)


@pytest.fixture(scope="module")
def comparison(base_model, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cmp") / "out"
    code, stdout, err = run_cli(["compare", str(base_model), "--methods", "l1,slim,random", "--out", str(out)]
                                + FAST)
    assert code == 0, err
    return out, stdout


def summary_of(out: Path) -> dict:
    return json.loads((out / "compare.json").read_text(encoding="utf-8"))


# ---- the real comparison ---------------------------------------------------------------------

def test_table_has_every_method_and_the_failure(comparison):
    out, stdout = comparison
    summary = summary_of(out)
    status = {e["method"]: e["status"] for e in summary["methods"]}
    assert status == {"l1": "ok", "slim": "failed", "random": "ok"}
    slim = next(e for e in summary["methods"] if e["method"] == "slim")
    assert "BatchNorm" in slim["error"] and "\n" not in slim["error"]
    for e in summary["methods"]:
        if e["status"] == "ok":
            own = json.loads((out / e["dir"] / "report.json").read_text(encoding="utf-8"))  # the method's own run
            assert e["accuracy"] == own["pruned"]["accuracy"] and e["macs"] == own["pruned"]["macs"]
            assert e["macs_reduction"] >= 0.5 - 1e-9 and e["macs_reduction"] == own["reduction"]["macs"]
            assert 1 <= e["evaluations"] == own["search"]["evaluations"] <= 3
            assert e["budget"] == 3 and set(e["speedup"]) == {"1", "4"}
            assert own["base"]["macs"] == summary["base"]["macs"]  # every method pruned the same model
    assert summary["complete"] is True and summary["base"]["macs"] > 0
    for method in ("l1", "random"):  # the terminal table: one row per method, failures included
        assert re.search(rf"^{method}\s+\d+\.\d\d%\*?\s+[+-]\d", stdout, re.M)
    assert re.search(r"^slim\s+FAILED", stdout, re.M)
    assert "slim failed: method 'slim' needs a BatchNorm" in stdout
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert re.search(r"^\| l1 \| ", md, re.M) and re.search(r"^\| random \| ", md, re.M)
    assert "| slim | FAILED |" in md and "slim failed: method 'slim' needs a BatchNorm" in md
    assert "3 candidate evaluations for every method" in md


def test_every_artifact_is_written(comparison):
    out, _ = comparison
    for name in ("compare.json", "compare.md", "compare_run.json", "report.html") + FIGURES:
        assert (out / name).is_file(), name
    for name in FIGURES:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    for method in ("l1", "random"):  # each method's own run, with the single-run report and figures
        for name in ("model.pt", "report.json", "report.md", "report.html", "history.jsonl") + FIGURES:
            assert (out / method / name).is_file(), f"{method}/{name}"
    assert not (out / "slim" / "report.json").exists()
    assert not list(out.rglob("*.tmp")), "a temporary file of an atomic write was left behind"


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img[^>]*\ssrc="data:image/png;base64,([A-Za-z0-9+/=]+)"',
                                                    page)]


@pytest.mark.parametrize("page", ["report.html", "l1/report.html"])
def test_html_is_self_contained(comparison, page):
    out, _ = comparison
    text = (out / page).read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I), "external resource"
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    srcs = re.findall(r"""<img[^>]*\ssrc\s*=\s*["']([^"']*)""", text)
    assert len(srcs) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in srcs)
    images = embedded_images(text)
    assert len(images) == len(FIGURES) and all(img.startswith(PNG_MAGIC) for img in images)
    # the embedded figures are the PNG files written beside the page
    assert images == [(out / Path(page).parent / name).read_bytes() for name in FIGURES]


def test_comparison_html_mentions_every_method_and_the_error(comparison):
    out, _ = comparison
    text = (out / "report.html").read_text(encoding="utf-8")
    for method in ("l1", "slim", "random"):
        assert f"<td>{method}</td>" in text
    assert "needs a BatchNorm" in text and 'class="failed"' in text


# ---- the table's best marks ------------------------------------------------------------------

def row(method: str, accuracy: float, size: int, speed1: float, search: float, evals: int) -> dict:
    return {"method": method, "status": "ok", "dir": method, "accuracy": accuracy,
            "accuracy_change_points": round(100 * (accuracy - 0.95), 3), "params_reduction": 0.8,
            "macs_reduction": 0.8, "size_bytes": size, "speedup": {"1": speed1, "256": 2.0},
            "search_seconds": search, "finetune_seconds": 10.0, "evaluations": evals, "budget": 50}


HAND_MADE = {
    "methods": [
        row("a", 0.90, 40_000, 1.5, 3.0, 50),
        row("b", 0.91, 50_000, 1.5, 9.0, 50),
        row("c", 0.89, 30_000, 1.2, 1.0, 12),
        {"method": "d", "status": "failed", "dir": "d", "error": "boom"},
    ],
    "latency_batch_sizes": ["1", "256"],
    "budget_text": "50",
}


def test_best_marks_on_hand_made_rows():
    best = best_methods(HAND_MADE["methods"], columns(["1", "256"]))
    assert best["accuracy"] == ["b"] and best["accuracy_change"] == ["b"]
    assert best["size"] == ["c"]  # lower is better
    assert best["speedup_1"] == ["a", "b"]  # a tie at the displayed precision: both marked
    for tied in ("params_reduction", "macs_reduction", "speedup_256"):
        assert tied not in best  # every row ties: nothing to mark
    for cost in ("search_seconds", "finetune_seconds", "evaluations", "distinct", "budget"):
        assert cost not in best  # costs are not results: never marked, although c spent the least
    assert not any("d" in v for v in best.values())

    table = comparison_table(HAND_MADE)
    marked = {(r[0].text, table.headers[i]) for r in table.rows for i, c in enumerate(r) if c.best}
    assert marked == {("b", "test acc."), ("b", "change (pts)"), ("c", "size (KiB)"), ("a", "speed-up b=1"),
                      ("b", "speed-up b=1")}
    md = markdown(HAND_MADE)
    assert re.search(r"^\| b \| \*\*91\.00%\*\* \| \*\*-4\.00\*\* \|", md, re.M)
    assert re.search(r"^\| a \| 90\.00% \|", md, re.M)
    assert "| d | FAILED |" in md and "d failed: boom" in md
    assert md.startswith("# autoprune comparison: None / None\n")  # no model or dataset recorded
    titled = markdown({**HAND_MADE, "title": "ResNet-20\n| x |\n# on CIFAR-10"})
    assert titled.startswith("# ResNet-20 | x | # on CIFAR-10\n\n")  # a title is one heading line, whatever it holds
    text = terminal_table(HAND_MADE)
    assert re.search(r"^b\s+91\.00%\*", text, re.M) and re.search(r"^a\s+90\.00%\s", text, re.M)
    assert re.search(r"^c\s.*\s29\.3\*\s", text, re.M)


def test_running_max_and_method_parsing():
    assert running_max([0.2, float("nan"), 0.1, 0.5, float("-inf"), 0.4]) == [0.2, 0.2, 0.2, 0.5, 0.5, 0.5]
    assert parse_methods(" l1, random ") == ["l1", "random"]
    assert parse_methods("all")[:5] == ["otp", "pso", "sa", "ssa", "gdp"] and len(parse_methods("all")) >= 9
    with pytest.raises(AutopruneError, match="listed twice"):
        parse_methods("l1,l1")
    with pytest.raises(AutopruneError, match="empty"):
        parse_methods(" , ")


def test_method_options_go_to_the_methods_that_read_them():
    assert options_for("pso", {"particles": "5"}) == {"particles": "5"}
    assert options_for("l1", {"particles": "5"}) == {}
    check_options(["l1", "pso"], {"particles": "5"})  # read by pso: accepted
    with pytest.raises(AutopruneError, match="is taken by none of the compared methods"):
        check_options(["l1", "random"], {"particles": "5"})
    with pytest.raises(AutopruneError, match="option particles='many' for method 'pso' must be an integer"):
        check_options(["l1", "pso"], {"particles": "many"})
    assert options_for("slim", {"epochs": 2, "particles": 3}) == {"epochs": 2}
    assert options_for("sa", {"epochs": 2, "particles": 3}) == {"epochs": 2}


# ---- validation before long work -------------------------------------------------------------

def test_unknown_method_is_one_line_error_before_any_work(base_model, tmp_path):
    out = tmp_path / "never"
    code, stdout, err = run_cli(["compare", str(base_model), "--methods", "l1,bogus", "--out", str(out)] + FAST)
    assert code == 1 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("autoprune: error: unknown method 'bogus'")
    assert "valid methods:" in err and "otp" in err and "random" in err
    assert not out.exists()


def test_unreachable_target_fails_before_any_method(base_model, tmp_path):
    out = tmp_path / "never"
    args = ["compare", str(base_model), "--methods", "l1", "--out", str(out)] + FAST
    args[args.index("0.5")] = "0.9999"
    code, _, err = run_cli(args)
    assert code == 1 and "unreachable" in err and err.count("\n") == 1
    assert not out.exists()


def test_existing_output_needs_force(comparison, base_model):
    out, _ = comparison
    code, _, err = run_cli(["compare", str(base_model), "--methods", "l1", "--out", str(out)] + FAST)
    assert code == 1 and "--force" in err and "--resume" in err
    assert summary_of(out)["complete"] is True  # untouched
    (out / "mine.txt").write_text("mine")
    code, _, err = run_cli(["compare", str(base_model), "--methods", "l1", "--out", str(out), "--force"] + FAST)
    assert code == 1 and "holds an autoprune comparison and also 'mine.txt'" in err
    assert (out / "mine.txt").read_text() == "mine" and summary_of(out)["complete"] is True
    (out / "mine.txt").unlink()
    (out / "l1" / "notes.txt").write_text("mine")  # inside a method's run: not the comparison's either
    code, _, err = run_cli(["compare", str(base_model), "--methods", "l1", "--out", str(out), "--force"] + FAST)
    assert code == 1 and "holds an autoprune comparison and also 'l1'" in err
    assert (out / "l1" / "notes.txt").read_text() == "mine"
    (out / "l1" / "notes.txt").unlink()


# ---- resume and interruption (one method's run replaced by a recording fake) --------------------------------

class FakeExecute:
    """Stands in for autoprune.api.execute: records calls, writes run.json, raises or returns a saved report."""

    def __init__(self, reports: dict[str, dict], interrupt: set[str] = frozenset()) -> None:
        self.reports, self.interrupt, self.calls = reports, interrupt, []

    def __call__(self, model, example_inputs, config, method, data, *, out, resume=False, **kwargs):
        self.calls.append((config.method, resume))
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text("{}", encoding="utf-8")
        if config.method in self.interrupt:
            raise SearchInterrupted("interrupted after 1 evaluations")
        if config.method not in self.reports:
            raise RuntimeError("boom\nsecond line")
        report = self.reports[config.method]
        (out / "report.json").write_text(json.dumps(report), encoding="utf-8")
        return PruneResult.from_json(report)


def saved_reports(out: Path) -> dict[str, dict]:
    return {m: json.loads((out / m / "report.json").read_text(encoding="utf-8")) for m in ("l1", "random")}


def test_resume_skips_finished_methods(comparison, tmp_path, monkeypatch):
    src, _ = comparison
    out = tmp_path / "cmp"
    shutil.copytree(src, out)
    reports = saved_reports(src)
    (out / "random" / "report.json").unlink()  # random was interrupted: run.json and history remain
    assert not (out / "slim" / "run.json").exists()  # slim failed on its inputs: nothing of it to resume
    fake = FakeExecute(reports)
    monkeypatch.setattr("autoprune.api.execute", fake)
    code, stdout, err = run_cli(["compare", "--resume", str(out), "--quiet"])
    assert code == 0, err
    assert fake.calls == [("slim", False), ("random", True)]  # l1 finished: skipped; the others ran again
    assert "l1: already finished, skipped" in stdout
    methods = {e["method"]: e for e in summary_of(out)["methods"]}
    assert methods["l1"]["skipped"] is True and methods["random"]["resumed"] is True
    assert methods["slim"]["status"] == "failed" and methods["slim"]["error"] == "RuntimeError: boom"
    assert methods["random"]["accuracy"] == reports["random"]["pruned"]["accuracy"]


def test_interrupted_comparison_can_be_resumed(comparison, base_model, tmp_path, monkeypatch):
    src, _ = comparison
    out = tmp_path / "cmp"
    fake = FakeExecute(saved_reports(src), interrupt={"random"})
    monkeypatch.setattr("autoprune.api.execute", fake)
    code, _, err = run_cli(["compare", str(base_model), "--methods", "l1,random", "--out", str(out)] + FAST)
    assert code == cli.EXIT_INTERRUPTED
    assert err == (f"autoprune: comparison interrupted during random; continue with "
                   f"`autoprune compare --resume {out}`\n")
    partial = {e["method"]: e["status"] for e in summary_of(out)["methods"]}
    assert partial == {"l1": "ok", "random": "interrupted"} and not summary_of(out)["complete"]
    assert (out / "report.html").exists() and "Incomplete" in (out / "compare.md").read_text(encoding="utf-8")

    fake.interrupt, fake.calls = set(), []
    code, _, err = run_cli(["compare", "--resume", str(out), "--quiet"])
    assert code == 0, err
    assert fake.calls == [("random", True)]
    assert [e["status"] for e in summary_of(out)["methods"]] == ["ok", "ok"] and summary_of(out)["complete"]


def test_resume_keeps_the_settings_the_methods_share(comparison):
    out, _ = comparison
    code, _, err = run_cli(["compare", "--resume", str(out), "--finetune-epochs", "1"])
    assert code == 1 and err.count("\n") == 1
    assert (f"--resume continues the comparison in {str(out)!r} with the settings (its methods share them) it "
            "started with, so --finetune-epochs cannot be given") in err
    assert summary_of(out)["complete"] is True
