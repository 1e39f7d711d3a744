"""The mutation check (``scripts/mutants.py``) in CI: every deliberate fault is caught by its tests, and a
fault whose code line changed is reported, never skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import mutants  # noqa: E402


def test_every_fault_still_applies_to_the_source():
    assert mutants.check_patterns() == []
    names = [f.name for f in mutants.FAULTS]
    assert len(names) == len(set(names))
    for required in ("leaked-snapshots", "off-by-one-cooldown-lr", "skip-rng-restore", "skip-buffer-restore",
                     "skip-optimizer-state-restore", "no-signal-guard", "rerun-finished-forks"):
        assert required in names


def test_a_fault_that_no_longer_applies_is_reported():
    lost = mutants.Fault("lost", "a line that is gone", [mutants.Edit("cooldown_callbacks/engine.py",
                                                                      "this line is not in the engine", "pass")],
                         ["tests/test_plan.py::test_no_such_test"])
    problems = mutants.check_patterns(ROOT, [lost])
    assert any("occurs 0 times" in p and "update this fault" in p for p in problems), problems
    assert any("test tests/test_plan.py::test_no_such_test not found" in p for p in problems), problems
    broken = mutants.Fault("broken", "does not compile", [mutants.Edit("cooldown_callbacks/engine.py",
                                                                       "if not self._resumed:", "if (:")],
                           ["tests/test_plan.py"])
    assert any("does not compile" in p for p in mutants.check_patterns(ROOT, [broken]))


def test_unknown_fault_names_are_refused(capsys):
    with pytest.raises(SystemExit, match="2"):
        mutants.main(["no-such-fault"])
    assert "unknown fault(s) ['no-such-fault']" in capsys.readouterr().err


def test_an_edit_replaces_exactly_one_line_keeping_its_indentation():
    src = "def f():\n    a = 1\n    return a\n"
    edit = mutants.Edit("x.py", "a = 1", "a = 2\nb = 3")
    assert mutants.apply_edit(src, edit) == "def f():\n    a = 2\n    b = 3\n    return a\n"
    with pytest.raises(mutants.PatternLost, match=r"occurs 2 times \(expected exactly once\)"):
        mutants.apply_edit(src + src, edit)


@pytest.mark.slow
def test_every_deliberate_fault_is_caught():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutants.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=1200)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
    assert f"{len(mutants.FAULTS)} of {len(mutants.FAULTS)} faults caught" in out.stdout
