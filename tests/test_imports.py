"""The layering: arrows point down only. Every ``import`` of a trustrl module by another
(at module level or inside a function) is an edge; the graph must have no circle, the
functional core (advantages, losses, kl_control, trpo, logprobs) imports nothing of ours but
each other, and the config schemas import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import trustrl

PACKAGE = Path(trustrl.__file__).parent
CORE = {"trustrl.advantages", "trustrl.losses", "trustrl.kl_control", "trustrl.trpo", "trustrl.logprobs"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # ``from pkg import submodule`` depends on the submodule; ``from mod import name`` on mod
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base] + subs
            for t in targets:
                # the longest known module that the import names (``from a import b`` may name module a.b)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                # a module's own ancestor packages run first anyway: not a layering edge
                if t and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if colour.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if colour.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_functional_core_imports_only_itself():
    graph = import_graph()
    for module in CORE:
        assert graph[module] <= CORE, f"{module} imports {sorted(graph[module] - CORE)}"


def test_config_schemas_import_no_torch():
    code = ("import sys, trustrl.config as c; "
            "c.GRPOConfig, c.PPOConfig, c.TRPOConfig, c.SFTConfig, c.PretrainConfig, c.RewardConfig; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
