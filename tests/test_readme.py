"""Every Python snippet in README.md runs, as written, with tiny models, and its forks succeed.

The snippets are taken from README.md at test time (so the test follows whatever the README says):
each fenced ``python`` block is executed in a fresh folder with the names it uses but does not define
supplied by ``tests/_readme_env.py`` (a fragment of a sharded script runs as the one rank of a process
group). Snippets are written for real runs, so every integer literal >= 100 is divided by 100
(``max_steps=10_000`` -> 100, ``every=1000`` -> 10, ``warmup_steps=200`` -> 2): the same plan at 1/100 of
the scale. A snippet that builds an adapter and trains must leave fork records, all ok.
"""

from __future__ import annotations

import ast
import builtins
import re
import warnings
from pathlib import Path

import pytest

import _readme_env
from cooldown_callbacks.records import read_records

README = Path(__file__).resolve().parents[1] / "README.md"
SCALE = 100


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, source)`` of every fenced python block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, flags=re.M | re.S)]


class _Scale(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        if type(node.value) is int and node.value >= SCALE:
            return ast.copy_location(ast.Constant(max(1, node.value // SCALE)), node)
        return node


def used_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """``(read, free)``: global names a snippet reads (not imports or defs; a function's arguments and
    locals are its own), and those it never binds at all. A name it reads before binding it
    (``model, opt = accelerator.prepare(model, opt)``) is in ``read`` only: supplied when the
    environment has it, not required."""
    assigned, defined, read = set(), set(), set()

    def visit(node: ast.AST, local: frozenset) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if not isinstance(node, ast.Lambda):
                defined.add(node.name)
            inner = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            body = node.body if isinstance(node.body, list) else [node.body]
            inner |= {n.id for b in body for n in ast.walk(b)
                      if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
            for d in node.args.defaults + node.args.kw_defaults:
                if d is not None:
                    visit(d, local)
            for b in body:
                visit(b, local | inner)
            return
        if isinstance(node, ast.Name) and node.id not in local:
            (read if isinstance(node.ctx, ast.Load) else assigned).add(node.id)
        elif isinstance(node, ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, local)

    visit(tree, frozenset())
    read -= defined | set(dir(builtins))
    return read, read - assigned


BLOCKS = python_blocks(README.read_text())


def test_readme_has_the_adapter_snippets():
    kinds = [_readme_env.framework(src) for _, src in BLOCKS]
    assert {"lightning", "transformers", "accelerate"} <= set(kinds), kinds


@pytest.mark.parametrize("line,source", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_snippet_runs(line, source, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    tree = ast.fix_missing_locations(_Scale().visit(ast.parse(source)))
    with _readme_env.environment(source, *used_names(tree)) as env, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frameworks' own chatter about tiny CPU runs
        exec(compile(tree, f"README.md:{line}", "exec"), env)  # noqa: S102 - the README's own code
    if re.search(r"\bCooldown(Hook|Callback|TrainerCallback)\(", source) and re.search(r"\.(step|fit|train)\(", source):
        found = [r for p in sorted(tmp_path.rglob("forks.jsonl")) for r in read_records(p)]
        assert found, "the snippet's run wrote no fork records"
        bad = [(r["step"], r.get("error")) for r in found if r["status"] != "ok"]
        assert not bad, f"failed forks: {bad}"
