"""Every benchmark's ``--quick`` mode runs and produces results of the right shape (no timing asserts).

Each benchmark's ``main(["--quick", "--out", tmp])`` is called in this process; the test checks the
printed table, the JSON keys and table shapes, the markdown header and the PNG plots.
"""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

HEADER_KEYS = {"benchmark", "command", "date", "machine", "python", "versions", "torch_threads", "loadavg_start",
               "loadavg_end", "git_commit", "git_clean", "git_uncommitted"}


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def load(out: Path, name: str, script: str | None = None) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert HEADER_KEYS <= data["header"].keys()
    assert data["header"]["command"].startswith(f".venv/bin/python benchmarks/{script or name}.py --quick")
    assert {"torch", "lightning", "transformers", "accelerate"} <= data["header"]["versions"].keys()
    head = data["header"]
    assert len(head["git_commit"]) == 40 and isinstance(head["git_clean"], bool)
    assert head["git_clean"] == (head["git_uncommitted"] == [])
    md = (out / f"{name}.md").read_text()
    assert md.startswith(f"# {name}\n") and "- machine:" in md and "- command:" in md
    assert f"code: git {head['git_commit']}, " + ("clean tree" if head["git_clean"] else "UNCOMMITTED CHANGES") in md
    for t in data["tables"]:
        assert t["rows"], t["title"]
        assert all(len(r) == len(t["columns"]) for r in t["rows"]), t["title"]
        assert f"## {t['title']}" in md
    return data


def table(data: dict, i: int) -> tuple[list[str], list[list]]:
    t = data["tables"][i]
    return t["columns"], t["rows"]


def test_overhead_quick(tmp_path, capsys):
    import bench_overhead

    bench_overhead.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "LambdaLR ms/step (median)" in printed and "results written to" in printed
    data = load(tmp_path, "bench_overhead")
    cols, rows = table(data, 0)
    assert cols[:5] == ["adapter", "hook ms/step (median)", "LambdaLR ms/step (median)", "ratio of medians [95% CI]",
                        "ratio, paired median [95% CI]"]
    names = [r[0] for r in rows]
    assert names[:2] == ["accelerate", "plain"]  # Lightning / HF follow when their adapters import and run
    assert set(names) | set(data["skipped"]) == set(bench_overhead.ADAPTERS)
    for name in names:
        a = data["adapters"][name]
        assert len(a["hook_s_per_step"]) == len(a["lambdalr_s_per_step"]) == 1
        for key in ("ratio_of_medians", "paired_ratio", "cpu_ratio_of_medians", "cpu_paired_ratio"):
            assert a[key]["ci95"][0] <= a[key]["value"] <= a[key]["ci95"][1] and a[key]["value"] > 0
        assert a["meets_1.02"] == (a["paired_ratio"]["ci95"][1] <= 1.02) and a["adapter_own_s_per_step"] >= 0
        assert a["verdict"] == "yes" if a["meets_1.02"] else a["verdict"].startswith("not shown: ")
    assert set(data["micro_s_per_call"]) == {"hook.step + pre-hook", "LambdaLR.step"}


def test_overhead_target_is_met_only_when_the_interval_is_within_it():
    import bench_overhead

    own = [1e-5] * 10
    quiet = {"hook": [1.00 + 0.002 * (i % 3) for i in range(10)], "lambdalr": [1.0] * 10}
    noisy = {"hook": [0.85, 1.25, 0.9, 1.15, 0.95, 1.1, 0.97, 1.01, 0.99, 1.3], "lambdalr": [1.0] * 10}
    met = bench_overhead.summarise(quiet, quiet, own)
    assert met["meets_1.02"] and met["verdict"] == "yes" and met["paired_ratio"]["ci95"][1] <= 1.02
    missed = bench_overhead.summarise(noisy, noisy, own)
    lo, hi = missed["paired_ratio"]["ci95"]
    assert not missed["meets_1.02"] and lo < missed["paired_ratio"]["value"] <= 1.02 < hi  # median within, CI not
    assert missed["verdict"] == f"not shown: {missed['paired_ratio']['value']:.3f} measured, 95% CI up to {hi:.3f}"


def test_bootstrap_interval_keeps_pairs_and_is_reproducible():
    import _common

    rounds = [(1.0 + 0.01 * i, 1.0 + 0.01 * i) for i in range(8)]  # hook == baseline in every round
    assert _common.bootstrap_ci(rounds, lambda r: _common.median([a / b for a, b in r])) == (1.0, 1.0)
    skewed = [(1.0, 1.0), (1.1, 1.0), (0.9, 1.0), (1.05, 1.0), (0.95, 1.0)]
    stat = lambda r: _common.median([a / b for a, b in r])  # noqa: E731
    lo, hi = _common.bootstrap_ci(skewed, stat)
    assert lo < 1.0 < hi and (lo, hi) == _common.bootstrap_ci(skewed, stat)


def test_snapshot_quick(tmp_path):
    import bench_snapshot

    bench_snapshot.main(["--quick", "--out", str(tmp_path)])
    data = load(tmp_path, "bench_snapshot")
    cols, rows = table(data, 0)
    assert [r[0] for r in rows] == ["raw clone", "raw copy_", "snapshot (cpu)", "restore (cpu)"]
    assert len(cols) == 12
    assert data["config"]["state_bytes"] > 0 and data["config"]["reps"] == 2
    assert set(data["targets_met"]) == {"snapshot (cpu) <= 1.5x raw clone", "restore (cpu) <= 1.5x raw copy_",
                                        "snapshot (cpu) extra memory <= 1.05x state",
                                        "restore (cpu) extra memory <= 1.05x state"}
    # a snapshot holds a copy of the state: its peak extra memory is at least the state's size
    assert data["ratios"]["snapshot (cpu)"]["extra_over_state"] > 0.5


def test_fork_vs_manual_quick(tmp_path):
    import bench_fork_vs_manual

    bench_fork_vs_manual.main(["--quick", "--out", str(tmp_path)])
    data = load(tmp_path, "bench_fork_vs_manual")
    cols, rows = table(data, 0)
    assert cols[5:7] == ["manual / fork", ">= 2x"] and cols[-2:] == ["CPU manual / fork", "same result"]
    assert len(rows) == 1
    assert rows[0][-1] == "yes"  # the new process and the fork produce the same cooled model
    _, brk = table(data, 1)
    assert [r[1] for r in brk] == ["fork (in process)", "manual (new process)"]
    size = data["sizes"][0]
    assert size["all_same_val_loss"] and len(size["points"]) == 1
    assert {"startup_s", "data_s", "build_s", "load_s", "cooldown_s", "eval_s", "save_s"} <= size["manual"].keys()
    cols, over = table(data, 2)
    assert cols[5] == "CPU ratio [95% CI]" and len(over) == 1
    o = size["fork_overhead"]
    assert o["steps"] == 3 and len(o["fork_cpu_s"]) == len(o["bare_cpu_s"]) == o["rounds"] == 2
    for key in ("cpu_ratio", "wall_ratio"):
        assert 0 < o[key]["ci95"][0] <= o[key]["value"] <= o[key]["ci95"][1]


@pytest.mark.parametrize("setting", ["small", "regime"])
def test_budgets_quick(tmp_path, setting):
    import bench_budgets

    bench_budgets.main(["--quick", "--setting", setting, "--out", str(tmp_path)])
    name = "bench_budgets" if setting == "small" else "bench_budgets_regime"
    data = load(tmp_path, name, script="bench_budgets")
    cols, rows = table(data, 0)
    assert [r[0] for r in rows] == [10, 20]
    assert cols[2:6] == ["cooled 1-sqrt (best LR)", "cooled linear (best LR)", "cosine (best LR)",
                         "main branch at T, no cooldown (best LR)"]
    cfg, grid_info = data["config"], data["lr_grid"]
    assert cfg["setting"] == setting and cfg["initial_lrs"] == [0.002, 0.004]
    # two LRs can bracket nothing: the grid was extended (once per side in quick mode) and says what is left
    assert len(grid_info["extensions"]) == 1 and cfg["lrs"] == sorted(cfg["initial_lrs"] + grid_info["extensions"][0]["added"])
    assert grid_info["all_bracketed"] == (grid_info["not_bracketed"] == [])
    assert grid_info["note"].startswith("LR grid: started at 0.002, 0.004; added ") and grid_info["note"] in \
        (tmp_path / f"{name}.md").read_text()
    for d in data["per_budget"]:
        for family, inside in d["bracketed"].items():
            assert inside == ((family, d["T"]) not in {(a["family"], a["T"]) for a in grid_info["not_bracketed"]})
    _, grid = table(data, 1)
    assert len(grid) == len(cfg["lrs"]) * 2  # LRs x budgets, every LR of the final grid
    _, cost = table(data, 2)
    assert [r[0] for r in cost] == [f"{lr:g}" for lr in cfg["lrs"]] + ["grid total"]
    assert {"cooled_1sqrt", "cosine", "main_branch_best", "cooled_linear", "cosine_lr_over_wsd_lr"} <= \
        data["per_budget"][0].keys()
    # the headline's premise, checked inside the benchmark: a fork equals a separate fixed-budget run
    assert data["fork_equals_fixed_budget_run"]["identical"]
    for png in data["plots"]:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data["plots"]) == 2 and all(p.startswith(f"{name}_") for p in data["plots"])  # one setting's own plots
    for png in data["plots"]:
        (tmp_path / png).unlink()
    bench_budgets.main(["--replot", str(tmp_path / f"{name}.json")])  # plots redrawn from the JSON alone
    assert all((tmp_path / png).exists() for png in data["plots"])


def test_lr_grid_edges_and_description():
    import bench_budgets

    lrs = [1e-3, 2e-3, 4e-3]
    forked = {lr: {f: {100: {1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.7}[lr]} for f in bench_budgets.FAMILIES if f != "cosine"}
              for lr in lrs}
    cos = {(lr, 100): {"val_loss": {1e-3: 1.9, 2e-3: 1.8, 4e-3: 1.6}[lr]} for lr in lrs}
    assert bench_budgets.edges(forked, cos, [100], lrs) == [{"family": "cosine", "T": 100, "lr": 4e-3, "side": "high"}]
    note = bench_budgets.describe_grid(lrs, lrs, [], bench_budgets.edges(forked, cos, [100], lrs), 4)
    assert note.endswith("NOT BRACKETED after 4 extension(s) per side: cosine T=100 (best 0.004, high edge)")


def test_convex_quick(tmp_path):
    import bench_convex

    bench_convex.main(["--quick", "--out", str(tmp_path)])
    data = load(tmp_path, "bench_convex")
    cols, rows = table(data, 0)
    assert [r[0] for r in rows] == ["cosine", "wsd-20%-linear", "wsd-20%-1-sqrt", "constant"]
    assert cols[1] == "bound gamma*"
    _, ratios = table(data, 1)
    assert len(ratios) == 3
    assert set(data["ratios"]["cosine"]) >= {"lr_ratio_predicted", "lr_ratio_measured_median"}
    # the prediction comes from cooldown_callbacks.theory: cosine's optimal base LR ~1.9x WSD-20%'s
    assert data["ratios"]["cosine"]["lr_ratio_predicted"] == pytest.approx(1.9, abs=0.05)
    assert (tmp_path / data["plots"][0]).read_bytes()[:4] == b"\x89PNG"


def test_exact_minimum_of_the_convex_toy():
    """``f*`` of the toy is exact: no point of a fine grid around ``w*`` does better, and a step off ``w*`` is worse."""
    import numpy as np

    import bench_convex

    X, y = bench_convex.problem(3)
    fstar, wstar = bench_convex.exact_minimum(X, y)
    g = np.linspace(-0.05, 0.05, 41)
    W = wstar + np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    assert bench_convex.f_values(W, X, y).min() >= fstar - 1e-12
    assert bench_convex.f_values(wstar[None], X, y)[0] == pytest.approx(fstar, abs=1e-12)


def test_quick_without_out_never_writes_the_committed_results(monkeypatch):
    import _common

    monkeypatch.setattr(_common.torch, "set_num_threads", lambda n: None)
    args = _common.base_parser("x").parse_args(["--quick"])
    out, env = _common.setup(args, "bench_x", ["--quick"])
    assert out != _common.RESULTS and _common.RESULTS not in out.parents
    assert env["command"] == ".venv/bin/python benchmarks/bench_x.py --quick"


def test_full_run_into_the_committed_results_needs_a_clean_tree(monkeypatch):
    import _common

    monkeypatch.setattr(_common.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(_common, "git_dirty", lambda: ["cooldown_callbacks/engine.py"])
    args = _common.base_parser("x").parse_args([])
    with pytest.raises(SystemExit, match=r"refusing to write benchmarks/results from a tree that is not a clean "
                                         r"commit \(UNCOMMITTED CHANGES in 1 file\(s\): cooldown_callbacks/engine.py"):
        _common.setup(args, "bench_x", [])
    env = _common.environment("bench_x", [])
    assert env["git_clean"] is False and env["git_uncommitted"] == ["cooldown_callbacks/engine.py"]
    monkeypatch.setattr(_common, "git_dirty", lambda: [])
    out, env = _common.setup(args, "bench_x", [])
    assert out == _common.RESULTS and env["git_clean"] is True


def test_plans_quick(tmp_path):
    import bench_plans

    bench_plans.main(["--quick", "--out", str(tmp_path)])
    data = load(tmp_path, "bench_plans")
    cols, rows = table(data, 0)
    assert [r[0] for r in rows] == ["on_eval", "geometric", "capped"]
    assert cols[3:6] == ["cooldown steps", "cooldown / main steps", "ForkPlan.cost ratio"]
    assert all(r[4] == r[5] for r in rows)  # the plan's own cost statement is what the run spent
    assert int(rows[2][2]) > 0  # the capped plan skipped forks
    _, fits = table(data, 1)
    assert [r[0] for r in fits] == ["on_eval", "geometric", "capped", "on_eval, all forks"]
    assert data["main_identical"]  # forks, skipped or not, never change the main branch
    assert data["truth"]["T"] == 60 and data["plans"]["on_eval"]["cooldown_steps"] > \
        data["plans"]["capped"]["cooldown_steps"]
    _, pm = table(data, 2)
    assert [r[0] for r in pm] == [32, 36, 40, 44, 48]  # fitted on the forks at 16..28
    assert (tmp_path / data["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
