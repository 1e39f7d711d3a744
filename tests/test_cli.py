"""The ``cooldown-callbacks`` command line: real PNGs, tables, and errors that say what to fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cooldown_callbacks import Cooldown
from cooldown_callbacks import cli
from cooldown_callbacks.cli import main, parse_cooldown, parse_schedule
from cooldown_callbacks.records import ForkRecord, append_record
from cooldown_callbacks.shapes import Tabulated, shape_from_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_real_png(path: Path, min_bytes: int = 10_000) -> None:
    import matplotlib.image as mpimg

    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert np.ptp(pixels[..., :3]) > 0.5  # dark lines on white, not a blank canvas
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 50  # several colours, antialiasing


def write_records(path: Path) -> None:
    forks = [
        ForkRecord(step=1000, cooldown_steps=250, shape="1-sqrt", metrics={"train_loss": 2.2, "val_loss": 2.31},
                   main_metrics={"train_loss": 2.5, "val_loss": 2.61}, seconds=12.5, lr=1e-3, grad_norms=[1.0] * 50),
        ForkRecord(step=2000, cooldown_steps=500, shape="1-sqrt", status="failed", error="CUDA out of memory",
                   main_metrics={"train_loss": 2.4, "val_loss": 2.47}, seconds=3.0, lr=1e-3),
        ForkRecord(step=4000, cooldown_steps=1000, shape="1-sqrt", metrics={"train_loss": 1.9, "val_loss": 2.05},
                   main_metrics={"train_loss": 2.2, "val_loss": 2.33}, seconds=40.0, lr=1e-3,
                   grad_norms=[1.0] * 50),
    ]
    for r in reversed(forks):  # the report sorts by step
        append_record(path, r)


# --------------------------------------------------------------------------------------------
# help and errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["plot"], ["bound"], ["transfer"], ["extend"], ["refine"], ["report"]])
def test_help_everywhere(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert out.startswith("usage: cooldown-callbacks")
    if command and command[0] in ("refine", "report"):
        assert "example: cooldown-callbacks " + command[0] in out
    else:  # the spec syntax is documented wherever specs are taken
        assert "KIND[:KEY=VALUE,...]" in out and "cooldown spec: KEY=VALUE" in out


def test_no_command_prints_help_and_fails(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err


@pytest.mark.parametrize(
    "argv, match",
    [
        pytest.param(["plot", "--schedule", "foo", "--out", "x.png"], "choose one of wsd", id="kind"),
        pytest.param(["plot", "--schedule", "wsd:warmup=abc", "--out", "x.png"], "not an integer", id="int"),
        pytest.param(["plot", "--schedule", "wsd:warm=3", "--out", "x.png"], "known keys: warmup", id="key"),
        pytest.param(["plot", "--schedule", "wsd", "--cooldown", "fraction=2", "--out", "x.png"],
                     r"Cooldown fraction.*\(0.0, 1.0\)", id="fraction"),
        pytest.param(["plot", "--schedule", "wsd", "--out", "x.png"], r"give --steps", id="plot-steps"),
        pytest.param(["plot", "--schedule", "wsd"], "--out", id="out"),
        pytest.param(["bound", "--schedule", "wsd"], r"give --steps T", id="bound-steps"),
        pytest.param(["bound", "--schedule", "cosine"], r"total=N in the spec or --steps", id="cosine-total"),
        pytest.param(["bound", "--schedule", "wsd", "--steps", "0"], r"must be an integer >= 1", id="steps0"),
        pytest.param(["bound", "--schedule", "wsd", "--steps", "10", "--cooldown", "steps=20"],
                     r"longer than the run", id="cd>T"),
        pytest.param(["transfer", "--lr", "-1", "--from", "fraction=0.2", "--to", "cosine"], r"> 0", id="lr"),
        pytest.param(["extend", "--from-steps", "100", "--to-steps", "50"], r"must be > T1", id="extend"),
        pytest.param(["extend", "--from-steps", "100", "--to-steps", "200", "--criterion", "best"],
                     r"invalid choice: 'best'", id="criterion"),
        pytest.param(["refine", "/nonexistent/norms.csv"], r"no such file", id="refine-missing"),
        pytest.param(["report", "/nonexistent/run"], r"no such file or folder; give a run directory", id="report-missing"),
    ],
)
def test_bad_input_exits_2_and_says_what_to_fix(capsys, tmp_path, monkeypatch, argv, match):
    import re

    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert re.search(match, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_user_error_from_the_console_script_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "cooldown_callbacks.cli", "bound", "--schedule", "wsd"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "give --steps T" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("wsd", "WSD(warmup_steps=0, warmup_shape='linear', warmup_start=0.0)", id="wsd"),
        pytest.param("wsd:warmup=1e3,warmup_shape=cosine", "WSD(warmup_steps=1000, warmup_shape='cosine', "
                     "warmup_start=0.0)", id="wsd-kw"),
        pytest.param("rsqrt:warmup=100,timescale=10_000", "RSqrt(warmup_steps=100, timescale=10000, "
                     "warmup_shape='linear', warmup_start=0.0)", id="rsqrt"),
        pytest.param("noam:warmup=40", "Noam(warmup_steps=40)", id="noam"),
    ],
)
def test_schedule_specs(text, expected):
    assert repr(parse_schedule(text).build()) == expected


def test_finite_schedule_specs_and_cooldown_specs():
    s = parse_schedule("cosine:total=100,warmup=10,final=0.1").build()
    assert s.total_steps == 100 and s(5) == 0.5 and s(100) == pytest.approx(0.1)
    assert parse_schedule("linear").build(total=50).total_steps == 50
    assert parse_cooldown("fraction=0.2,shape=1-sqrt") == Cooldown(fraction=0.2, shape="1-sqrt")
    assert parse_cooldown("steps=30,shape=exponential,half_life=0.2,final=0.1") == Cooldown(
        steps=30, shape="exponential", half_life=0.2, final_ratio=0.1)
    assert parse_cooldown("shape=linear") == Cooldown(fraction=0.2, shape="linear")
    with pytest.raises(ValueError, match=r"unknown key 'frac'; known keys: steps, fraction"):
        parse_cooldown("frac=0.2")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def test_plot_writes_a_real_png(capsys, tmp_path):
    out = tmp_path / "figs" / "sched.png"
    code, stdout, _ = run(capsys, "plot", "--schedule", "wsd:warmup=100", "--schedule", "rsqrt:warmup=100",
                          "--schedule", "cosine:total=1000", "--cooldown-at", "500", "800",
                          "--cooldown", "fraction=0.2,shape=1-sqrt", "--steps", "1000", "--out", str(out))
    assert code == 0 and f"wrote {out}" in stdout
    assert_real_png(out)


def test_plot_wsds_mode_and_default_length(capsys, tmp_path):
    out = tmp_path / "wsds.png"
    code, _, _ = run(capsys, "plot", "--schedule", "wsd:warmup=50", "--cooldown-at", "300", "700",
                     "--cooldown", "steps=100,shape=linear", "--mode", "wsd-s", "--rewarm", "20", "--lr", "3e-4",
                     "--out", str(out))
    assert code == 0
    assert_real_png(out)
    code, _, err = run(capsys, "plot", "--schedule", "wsd", "--cooldown-at", "300", "350", "--cooldown",
                       "steps=100", "--mode", "wsd-s", "--steps", "500", "--out", str(tmp_path / "bad.png"))
    assert code == 2 and "space the forks further apart" in err


def test_bound_table_transfer_column_and_plot(capsys, tmp_path):
    out = tmp_path / "bound.png"
    code, stdout, _ = run(capsys, "bound", "--schedule", "wsd", "--schedule", "cosine", "--cooldown",
                          "fraction=0.2,shape=linear", "--steps", "1000", "--lr", "1e-3", "--plot", str(out))
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split()[:4] == ["schedule", "T", "gamma*", "Omega*"]
    wsd_row, cos_row = lines[1].split(), lines[2].split()
    assert wsd_row[:4] == ["wsd", "+", "cooldown", "0.2"]
    assert "0.0161627" in wsd_row and "0.0306241" in cos_row
    assert "1.895" in cos_row and cos_row[-1] == "0.001895"  # gamma* ratio 1.8947 and the transferred LR
    assert_real_png(out)


def test_transfer(capsys):
    code, out, _ = run(capsys, "transfer", "--lr", "1e-3", "--from", "fraction=0.2,shape=linear", "--to",
                       "cosine", "--steps", "1000")
    assert code == 0 and "lr for the target: 0.001895  (x1.8947)" in out
    code, out, _ = run(capsys, "transfer", "--lr", "1e-3", "--from", "steps=200,shape=linear", "--to",
                       "steps=1000,shape=linear", "--steps", "1000", "--main", "wsd")
    assert code == 0 and "lr for the target: 0.001949  (x1.9488)" in out  # 100% linear decay vs 20%: larger LR


def test_extend(capsys, tmp_path):
    out = tmp_path / "extend.png"
    code, stdout, _ = run(capsys, "extend", "--from-steps", "4000", "--to-steps", "8000", "--lr", "1e-3",
                          "--criterion", "match", "--plot", str(out))
    assert code == 0
    assert "constant to step 3200" in stdout
    assert "rho = 0.5330: lr 0.000533 from step 3200" in stdout
    assert "cooldown from step 3200 (4800 steps)" in stdout
    assert_real_png(out)


def test_refine_csv_plain_and_with_header(capsys, tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(["2.0"] * 200) + "\n")
    code, out, _ = run(capsys, "refine", str(plain), "--points", "5")
    assert code == 0
    rows = [ln.split() for ln in out.splitlines()[2:]]
    assert rows == [["0.000", "1.0000", "1.0000"], ["0.250", "0.7500", "0.7500"], ["0.500", "0.5000", "0.5000"],
                    ["0.750", "0.2500", "0.2500"], ["1.000", "0.0000", "0.0000"]]

    with_header = tmp_path / "log.csv"
    n = 300
    p = np.arange(n) / (n - 1)
    norms = np.where(p < 0.8, 1.0, 1.0 + 10 * (p - 0.8))
    with_header.write_text("step,grad_norm,loss\n" + "".join(f"{i},{g},{3.0}\n" for i, g in enumerate(norms)))
    saved, png = tmp_path / "refined.json", tmp_path / "refined.png"
    code, out, _ = run(capsys, "refine", str(with_header), "--optimizer", "adam", "--save", str(saved),
                       "--plot", str(png))
    assert code == 0 and "from 300 gradient norms (adam" in out
    shape = shape_from_json(json.loads(saved.read_text()))
    assert isinstance(shape, Tabulated) and len(shape.values) == n
    assert shape(0.9) < 0.05  # the late rise gives a sharp final anneal (linear: 0.1)
    assert Cooldown(steps=100, shape=shape).factor(0, 100) == 1.0
    assert_real_png(png)


def test_refine_reads_fork_records_and_rejects_bad_csv(capsys, tmp_path):
    write_records(tmp_path / "forks.jsonl")
    code, out, _ = run(capsys, "refine", str(tmp_path), "--points", "3")
    assert code == 0 and "from 100 gradient norms" in out  # 50 + 50, the failed fork recorded none

    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n1,2.0\n")
    code, _, err = run(capsys, "refine", str(bad))
    assert code == 2 and "no column named grad_norm (columns: step, loss)" in err
    bad.write_text("1.0\n-2.0\n3.0\n")
    code, _, err = run(capsys, "refine", str(bad))
    assert code == 2 and "negative" in err
    bad.write_text("1.0\nabc\n")
    code, _, err = run(capsys, "refine", str(bad))
    assert code == 2 and "give one gradient norm per line" in err
    code, _, err = run(capsys, "refine", str(tmp_path / "forks.jsonl"), "--smoothing", "2")
    assert code == 2 and "Invalid smoothing (2.0)" in err
    empty = tmp_path / "empty"
    append_record(empty / "forks.jsonl", ForkRecord(step=10, cooldown_steps=2, shape="linear"))
    code, _, err = run(capsys, "refine", str(empty))
    assert code == 2 and "record_grad_norms=True" in err


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def spy_figures(monkeypatch) -> list:
    """The report's figures as (label, xs, ys) per line, plus the number of filled bands."""
    from cooldown_callbacks.cli import report

    figures = []
    real_save = report.save

    def spy(fig, out):
        ax = fig.axes[0]
        figures.append(([(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
                         if not line.get_label().startswith("_")], len(ax.collections)))
        real_save(fig, out)

    monkeypatch.setattr(report, "save", spy)
    return figures


def test_report_table_and_plot(capsys, tmp_path, monkeypatch):
    write_records(tmp_path / "run" / "forks.jsonl")
    figures = spy_figures(monkeypatch)
    png = tmp_path / "budget.png"
    code, out, _ = run(capsys, "report", str(tmp_path / "run"), "--plot", str(png))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"records: {tmp_path / 'run' / 'forks.jsonl'}"
    assert lines[1].split() == ["step", "cooldown", "total", "train_loss", "main", "train_loss", "seconds", "status"]
    assert lines[2].split() == ["1000", "250", "1250", "2.2", "2.5", "12.5", "ok"]
    assert lines[3].split()[:7] == ["2000", "500", "2500", "-", "2.4", "3.0", "failed:"]
    assert lines[3].endswith("failed: CUDA out of memory")
    assert lines[4].split() == ["4000", "1000", "5000", "1.9", "2.2", "40.0", "ok"]
    assert "3 forks, 1 failed (metric: train_loss; total = step + cooldown)" in out
    assert_real_png(png, min_bytes=5_000)
    (cooled, xs, ys), (main_label, mxs, mys) = figures[0][0]
    assert xs == [1250, 5000] and ys == [2.2, 1.9]  # the failed fork (2500) is not plotted
    assert mxs == [1000, 2000, 4000] and mys == [2.5, 2.4, 2.2]

    code, out, _ = run(capsys, "report", str(tmp_path / "run" / "forks.jsonl"), "--metric", "val_loss")
    assert code == 0 and out.splitlines()[2].split()[3:5] == ["2.31", "2.61"]
    code, _, err = run(capsys, "report", str(tmp_path / "run"), "--metric", "accuracy")
    assert code == 2 and "choose --metric from: train_loss, val_loss" in err


def test_report_without_loss_metric_or_records(capsys, tmp_path):
    append_record(tmp_path / "a" / "forks.jsonl",
                  ForkRecord(step=10, cooldown_steps=2, shape="linear", metrics={"acc": 0.5}))
    code, _, err = run(capsys, "report", str(tmp_path / "a"))
    assert code == 2 and "no metric name contains 'loss'; choose --metric from: acc" in err
    code, out, _ = run(capsys, "report", str(tmp_path / "a"), "--metric", "acc")
    assert code == 0 and "0.5" in out
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "forks.jsonl").write_text("")
    code, _, err = run(capsys, "report", str(tmp_path / "b"))
    assert code == 2 and "no fork records yet" in err


def hf_records(path: Path, run_id: str = "r1") -> None:
    """What the HF adapter records: cooled ``cooldown_*`` metrics, the main branch's ``eval_*`` ones."""
    for s, cooled, main in [(4, 2.61, 2.80), (8, 2.40, 2.55), (12, 2.31, 2.44)]:
        append_record(path, ForkRecord(step=s, cooldown_steps=3, shape="1-sqrt", run=run_id,
                                       metrics={"cooldown_loss": cooled, "cooldown_runtime": 0.1},
                                       main_metrics={"eval_loss": main, "eval_runtime": 0.1, "train_loss": 3.0}))


def test_report_pairs_hf_cooldown_loss_with_the_main_eval_loss(capsys, tmp_path):
    write_records(tmp_path / "out" / "checkpoint-500" / "cooldowns" / "forks.jsonl")  # something else below it
    hf_records(tmp_path / "out" / "cooldowns" / "forks.jsonl")  # written last, but output_dir/cooldowns comes first
    import os
    os.utime(tmp_path / "out" / "checkpoint-500" / "cooldowns" / "forks.jsonl")
    code, out, _ = run(capsys, "report", str(tmp_path / "out"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"records: {tmp_path / 'out' / 'cooldowns' / 'forks.jsonl'}"  # HF output_dir accepted
    assert lines[1].split() == ["step", "cooldown", "total", "cooldown_loss", "main", "eval_loss", "seconds", "status"]
    assert [ln.split()[3:5] for ln in lines[2:5]] == [["2.61", "2.8"], ["2.4", "2.55"], ["2.31", "2.44"]]


@pytest.mark.parametrize("metric,main_keys,expected", [
    ("val_loss", ["val_loss", "train_loss"], "val_loss"),
    ("cooldown_loss", ["eval_loss", "eval_runtime"], "eval_loss"),
    ("cooldown_loss", ["train_loss", "eval_loss"], "eval_loss"),  # two "loss" names: the evaluation's
    ("cooldown/val_loss", ["val_loss"], "val_loss"),  # Lightning's logged names
    ("cooldown/20pct/val_loss", ["val_loss"], "val_loss"),
    ("cooldown_loss", ["train_loss"], None),  # never a cooled evaluation beside a training loss
    ("val_acc", ["val_loss"], None),
])
def test_main_metric_pairing(metric, main_keys, expected):
    from cooldown_callbacks.cli.report import main_key_for

    assert main_key_for(metric, main_keys) == expected


def test_report_finds_records_below_the_folders_users_know(capsys, tmp_path):
    import os
    import time

    root = tmp_path / "lightning_root"  # Lightning: default_root_dir/<logger>/version_N/cooled/forks.jsonl
    old = root / "lightning_logs" / "version_0" / "cooled" / "forks.jsonl"
    new = root / "lightning_logs" / "version_1" / "cooled" / "forks.jsonl"
    write_records(old)
    hf_records(new)
    past = time.time() - 100
    os.utime(old, (past, past))
    code, out, _ = run(capsys, "report", str(root))
    assert code == 0
    assert out.splitlines()[0] == (f"records: {new} (the newest of 2 records files below {root}; give one of them "
                                   "to choose)")
    code, out, _ = run(capsys, "report", str(root / "lightning_logs" / "version_0"))  # the log dir
    assert code == 0 and out.splitlines()[0] == f"records: {old}"
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "report", str(tmp_path / "empty"))
    assert code == 2 and "no forks.jsonl in it or below it" in err


def test_report_resolves_checkpoints_relative_to_the_records_file(capsys, tmp_path, monkeypatch):
    """The engine writes a checkpoint's name (relative to forks.jsonl); the report finds it from anywhere."""
    from _loops import eval_fn, loss_fn, make_loader, make_model_opt, train
    from cooldown_callbacks import WSD, ForkPlan
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    monkeypatch.chdir(tmp_path)
    model, opt = make_model_opt()
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=WSD(warmup_steps=1), plan=ForkPlan(every=2, cooldown=Cooldown(steps=1)),
                        loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, dirpath="runs/a/cooled", verbose=False)
    train(model, opt, loader, 4, after_step=hook.step)
    raw = [json.loads(x) for x in (tmp_path / "runs/a/cooled/forks.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in raw] == ["cooled-step=00000002-cd=1.pt", "cooled-step=00000004-cd=1.pt"]
    assert hook.records[0]["checkpoint"] == str(Path("runs/a/cooled/cooled-step=00000002-cd=1.pt"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, _ = run(capsys, "report", "../runs/a")
    assert code == 0
    best = out.splitlines()[-1]
    assert best.startswith("lowest cooled val_loss:") and "(missing)" not in best
    assert Path(best.split(": ")[-1]).exists()
    # older records: absolute paths, or relative to where training ran, still resolve
    from cooldown_callbacks.records import read_records, resolve_checkpoint

    f = tmp_path / "runs/a/cooled/forks.jsonl"
    absolute = str(tmp_path / "runs/a/cooled/cooled-step=00000002-cd=1.pt")
    assert resolve_checkpoint(f, absolute) == absolute
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(f, "runs/a/cooled/cooled-step=00000002-cd=1.pt") == \
        "runs/a/cooled/cooled-step=00000002-cd=1.pt"
    monkeypatch.chdir(elsewhere)
    assert Path(resolve_checkpoint(f, "runs/a/cooled/cooled-step=00000002-cd=1.pt")).exists()  # by its name
    assert all(Path(r["checkpoint"]).exists() for r in read_records(f))


def labelled_records(path: Path) -> None:
    """Two cooldowns per fork point on a known law, a skipped fork point and the main branch's metrics."""
    law = {"20pct": lambda T: 1.2 + 29.2 * T ** -0.6, "10pct": lambda T: 1.25 + 29.2 * T ** -0.6}
    noise = [0.003, -0.002, 0.001, -0.003, 0.002, 0.0]
    for i, s in enumerate([100, 200, 300, 400, 500, 600]):
        for label, frac in (("20pct", 0.2), ("10pct", 0.1)):
            c = round(frac * s / (1 - frac))
            append_record(path, ForkRecord(step=s, cooldown_steps=c, shape="1-sqrt", label=label,
                                           metrics={"val_loss": law[label](s + c) + noise[i]},
                                           main_metrics={"val_loss": 1.3 + 29.2 * s ** -0.6}))
    for label in ("20pct", "10pct"):
        append_record(path, ForkRecord(step=700, cooldown_steps=175, shape="1-sqrt", label=label, status="skipped",
                                       reason="max_overhead=0.5: 1000 cooldown steps so far + 253 ..."))


def test_report_fit_per_cooldown_label_with_band_and_skipped_rows(capsys, tmp_path, monkeypatch):
    labelled_records(tmp_path / "run" / "forks.jsonl")
    figures = spy_figures(monkeypatch)
    png = tmp_path / "fit.png"
    code, out, _ = run(capsys, "report", str(tmp_path / "run"), "--fit", "--plot", str(png))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["step", "cooldown", "label", "total"]
    assert lines[2].split()[:4] == ["100", "11", "10pct", "111"] and lines[3].split()[:4] == ["100", "25", "20pct", "125"]
    assert sum("skipped: max_overhead=0.5" in ln for ln in lines) == 2
    assert "14 forks, 0 failed, 2 skipped" in out
    for label in ("20pct", "10pct"):
        block = out.split(f"budget curve of val_loss [{label}], fitted:")[1].split("budget curve of")[0]
        assert "L(T) = 1.2" in block and "T^-0.6" in block
        assert "predicted cooled loss at 2x the last budget" in block and "at 4x" in block and "90% band" in block
        assert "10% more steps" in block
    assert_real_png(png, min_bytes=5_000)
    lines_drawn, bands = figures[0]
    labels = [lab for lab, _, _ in lines_drawn]
    assert sum(lab.startswith("cooled") for lab in labels) == 2 and sum(lab.startswith("fit ") for lab in labels) == 2
    assert bands == 2  # one extrapolation band per cooldown
    ends = sorted(max(x) for lab, x, _ in lines_drawn if lab.startswith("fit "))
    assert ends == pytest.approx([4 * 667, 4 * 750])  # drawn out to 4x each cooldown's last budget


def test_report_fit_needs_three_budgets_and_scipy(capsys, tmp_path, monkeypatch):
    write_records(tmp_path / "run" / "forks.jsonl")  # two successful forks
    code, out, _ = run(capsys, "report", str(tmp_path / "run"), "--fit")
    assert code == 0 and "no fit - it needs cooled losses at 3 or more budgets (has 2)" in out
    monkeypatch.setitem(sys.modules, "scipy", None)
    code, out, err = run(capsys, "report", str(tmp_path / "run"), "--fit")
    assert code == 1 and "pip install 'cooldown-callbacks[fit]'" in err and out == ""
    code, _, err = run(capsys, "report", str(tmp_path / "run"), "--fit", "--level", "1.5")
    assert code == 2 and "must be a probability in (0, 1)" in err


def test_report_fit_from_drops_the_early_budgets(capsys, tmp_path):
    labelled_records(tmp_path / "run" / "forks.jsonl")
    code, out, _ = run(capsys, "report", str(tmp_path / "run"), "--fit", "--fit-from", "300")
    assert code == 0
    block = out.split("budget curve of val_loss [10pct], totals >= 300, fitted:")[1]
    assert "(4 cooled losses, T = 333..667" in block
    code, out, _ = run(capsys, "report", str(tmp_path / "run"), "--fit", "--fit-from", "600")
    assert "budget curve of val_loss [20pct], totals >= 600: no fit - it needs cooled losses at 3 or more budgets " \
           "(has 2)" in out
