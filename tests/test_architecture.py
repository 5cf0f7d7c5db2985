"""The layout's rules, measured from the code (docs/ARCHITECTURE.md "Who imports whom"): imports go
one way between engine's subpackages, engine never imports sweep or Optuna, there is no import
cycle (function-level imports included), and the study parser's vocabulary loads without torch."""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "sweep")

#: what each engine subpackage may import (besides itself and engine.progress)
ALLOWED = {
    "vocab": set(),
    "numerics": {"vocab"},
    "models": {"vocab", "numerics"},
    "accuracy": {"vocab", "numerics", "models"},
    "perf": {"vocab", "models"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, at any depth of the file (functions included)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `from pkg import module` names a module; `from mod import f` does not
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _third_party(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_import_cycle_function_level_imports_included():
    graph = _graph()
    # a package's __init__ is not an edge of its own modules' cycles (importing engine.x.y runs engine.x first)
    deps = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()}
    try:
        tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_engine_subpackages_import_only_downward():
    bad = []
    for mod, deps in _graph().items():
        parts = mod.split(".")
        if parts[0] != "engine" or len(parts) < 3:
            continue
        for dep in deps:
            dparts = dep.split(".")
            if dparts[0] == "sweep":
                bad.append(f"{mod} imports {dep} (engine never imports sweep)")
            elif dparts[0] == "engine" and len(dparts) > 1 and dparts[1] in ALLOWED and dparts[1] != parts[1]:
                if dparts[1] not in ALLOWED[parts[1]]:
                    bad.append(f"{mod} imports {dep}")
    assert not bad, bad


def test_every_engine_module_sits_in_a_subpackage():
    loose = [m for m, path in _modules().items()
             if m.count(".") == 1 and m.startswith("engine.") and path.name != "__init__.py" and m != "engine.progress"]
    assert not loose, loose
    for sub in ALLOWED:
        doc = ast.get_docstring(ast.parse((ROOT / "engine" / sub / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, f"engine/{sub}/__init__.py wants a one-line docstring"


def test_engine_never_imports_optuna_and_vocab_never_imports_torch():
    for path in (ROOT / "engine").rglob("*.py"):
        assert "optuna" not in _third_party(path), path
    for path in (ROOT / "engine" / "vocab").rglob("*.py"):
        assert not {"torch", "numpy"} & _third_party(path), path


def test_the_study_parser_loads_without_torch():
    code = "import sys, sweep.space; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_cycle_check_catches_a_function_level_cycle(tmp_path):
    """The rule can fail: a function-level import back up the chain is a cycle."""
    deps = {"a": {"b"}, "b": set()}
    fn = ast.parse("def f():\n    from a import x\n")
    deps["b"] |= {n.module for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)}
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(deps).static_order())


def test_no_function_over_60_lines_outside_tests():
    long = []
    for pkg in (*PACKAGES, "bench"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 60:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
