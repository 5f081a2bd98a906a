"""The package's shape: no import cycle, small modules, every lint silencer explained.

These are the rules a newcomer relies on when changing one module: what it imports does not
import it back (so it can be read and tested alone), no hand-written module is too long to hold
in one's head, and a `noqa` / `type: ignore` is a decision somebody wrote down, not a shrug.
Function-local imports are policed by ruff (PLC0415): each remaining one carries its reason.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "services" / "downpour"
GENERATED = PACKAGE / "v1"  # protoc's output, checked for drift by test_proto_drift.py
MAX_LINES = 400


def hand_written() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if GENERATED not in p.parents)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The downpour modules `path` imports, anywhere in the file (top level or in a function)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # downpour.v1.x and attributes resolve to their module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    files = hand_written()
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imported_modules(p, modules) for p in files}
    found = cycles(graph)
    assert not found, "modules that import each other, directly or through others:\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


@pytest.mark.parametrize("path", hand_written(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines; split it by concern (limit {MAX_LINES})"


SILENCER = re.compile(r"#\s*(noqa(?::\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?|type:\s*ignore(?:\[[\w\-, ]+\])?)(.*)$")


def silencers() -> list[tuple[str, str]]:
    out = []
    for top in ("services", "tests", "benchmarks", "scripts"):
        for p in sorted((ROOT / top).rglob("*.py")):
            if GENERATED in p.parents:
                continue
            for i, line in enumerate(p.read_text().splitlines(), 1):
                m = SILENCER.search(line)
                if m:
                    out.append((f"{p.relative_to(ROOT)}:{i}", m.group(0)))
    return out


def test_silencers_name_the_rule_and_say_why():
    bare = []
    for where, comment in silencers():
        m = SILENCER.search(comment)
        assert m is not None
        marker, rest = m.group(1), m.group(2)
        # the rule it silences, then words saying why ("- optional dependency", "# protobuf stubs ...")
        names_rule = ":" in marker if marker.startswith("noqa") else "[" in marker
        says_why = len(re.sub(r"[^A-Za-z]", "", rest)) >= 6
        if not (names_rule and says_why):
            bare.append(f"{where}: {comment}")
    assert not bare, "silencers without a rule or a reason:\n" + "\n".join(bare)
