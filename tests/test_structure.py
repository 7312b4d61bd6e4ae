"""The shape of the code: no import cycles, and using a model never imports the trainer."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cairn"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """cairn module -> the cairn modules it imports, anywhere in its body (inside functions too:
    an import hidden in a function is still a dependency). Importing a package's own parents
    (e.g. `from .. import __version__`) is left out: Python imports them first in any case."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules}
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = deps - ancestors - {name}
    return graph


def test_no_import_cycles_among_cairn_modules():
    graph = _imports()
    assert {"cairn.config", "cairn.loading", "cairn.training.loop", "cairn.run_tokenizer"} <= set(graph)
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """Guard: the check above fails on a graph with a cycle."""
    import pytest

    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    monkeypatch.setitem(globals(), "_imports", lambda: {**fake, "cairn.config": set(), "cairn.loading": set(),
                                                        "cairn.training.loop": set(), "cairn.run_tokenizer": set()})
    with pytest.raises(AssertionError, match="import cycle: a -> b -> c -> a"):
        test_no_import_cycles_among_cairn_modules()


def test_loading_evaluating_generating_exporting_and_serving_never_import_the_trainer():
    code = ("import sys, cairn.loading, cairn.generate, cairn.export, cairn.evaluate, cairn.checkpoint, "
            "cairn.run_tokenizer, cairn.serve, cairn.serve.app, cairn.serve.engine; "
            "print(sorted(m for m in sys.modules if m.startswith('cairn.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_imports_neither_data_nor_tokenizer_training():
    code = "import sys, cairn.config; print(sorted(m for m in sys.modules if m.startswith('cairn.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert "cairn.config" in loaded
    assert not any(m.startswith(("cairn.data", "cairn.tokenizer_train", "cairn.training", "cairn.run_tokenizer"))
                   for m in loaded), loaded
