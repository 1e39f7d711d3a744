"""The Accelerate example runs, writes fork records, and the CLI's report reads them."""

import subprocess
import sys
from pathlib import Path


from cooldown_callbacks.cli import main as cli_main
from cooldown_callbacks.records import read_records

ROOT = Path(__file__).resolve().parents[1]


def test_accelerate_example_quick_then_report(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import accelerate_charlm
    finally:
        sys.path.pop(0)
    out = tmp_path / "run"
    records = accelerate_charlm.main(["--quick", "--out", str(out)])
    table = capsys.readouterr().out
    assert "cooled val loss" in table and len(records) == 3
    recs = read_records(out)
    assert [r["step"] for r in recs] == [20, 40, 60] and all(r["status"] == "ok" for r in recs)
    assert all(r["main_metrics"]["val_loss"] > r["metrics"]["val_loss"] for r in recs)  # cooling helps
    png = tmp_path / "budget.png"
    assert cli_main(["report", str(out), "--plot", str(png)]) == 0
    report = capsys.readouterr().out
    assert all(str(s) in report for s in (20, 40, 60))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_accelerate_example_help():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "accelerate_charlm.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--max-steps" in res.stdout


def test_nanogpt_style_example_quick(tmp_path, capsys):
    """A loop without a DataLoader: data=<callable>, hook.step(step=iter_num), GradScaler, main metrics
    logged after the fork; the report pairs them with the cooled ones."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import nanogpt_style
    finally:
        sys.path.pop(0)
    records = nanogpt_style.main(["--quick", "--out", str(tmp_path / "run")])
    assert [r["step"] for r in records] == [10, 20, 30, 40] and all(r["status"] == "ok" for r in records)
    assert all(r["data"] == "callable" for r in records)
    recs = read_records(tmp_path / "run" / "cooled")
    assert all("val_loss" in r["main_metrics"] for r in recs[:3])  # logged at the top of the next iteration
    assert sorted(p.name for p in (tmp_path / "run" / "cooled").glob("*.pt"))[0] == "cooled-step00000010-cd2.pt"
    capsys.readouterr()
    assert cli_main(["report", str(tmp_path / "run" / "cooled")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("10 "))
    assert row.split()[4] != "-"  # the main branch's val_loss column is filled
