"""The package's shape: no import cycle, short functions, a short loop, a light top-level import."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "spine_ttrl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """spine_ttrl modules ``path`` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("spine_ttrl"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("spine_ttrl"))
    return found


def test_no_import_cycle():
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {m: {d for d in _imports(p) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def _body_lines(fn: ast.FunctionDef) -> int:
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        return (body[0].lineno - fn.lineno) + (fn.end_lineno - body[1].lineno + 1)
    return fn.end_lineno - fn.lineno + 1


def test_functions_are_short_and_the_loop_is_short():
    long = [f"{p.relative_to(SRC)}:{n.lineno} {n.name} ({_body_lines(n)} lines)"
            for p in SRC.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(n) > 80]
    assert not long, long
    assert len((SRC / "loop.py").read_text().splitlines()) <= 300
    adapt = next(n for n in ast.parse((SRC / "loop.py").read_text()).body
                 if isinstance(n, ast.FunctionDef) and n.name == "adapt")
    assert _body_lines(adapt) <= 120


def test_import_spine_ttrl_loads_no_heavy_library():
    code = ("import sys, spine_ttrl, spine_ttrl.config, spine_ttrl.answers, spine_ttrl.evaluate; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'vllm') if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
