"""The shape of the code: layers with one dependency direction, no import cycles, and using a model
never imports the trainer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cairn"

# Lowest first. A module may import from its own layer or below, never above; `cairn` itself (the
# Python API's facade) is the top, and no module imports it.
LAYERS = [
    ["cairn.version", "cairn.util"],
    ["cairn.runtime", "cairn.trackers"],
    ["cairn.tokenizer"],
    ["cairn.config"],
    ["cairn.model"],
    ["cairn.data"],
    ["cairn.checkpoint"],
    ["cairn.eval", "cairn.inference"],
    ["cairn.training"],
    ["cairn.tasks", "cairn.serve", "cairn.export", "cairn.bench"],
    ["cairn.cli", "cairn.__main__"],
    ["cairn"],
]


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """cairn module -> the cairn modules it imports, anywhere in its body (inside functions too:
    an import hidden in a function is still a dependency). `from pkg import name` depends on
    `pkg.name` when that is a module, else on `pkg` itself: importing a name from a parent
    package's `__init__` counts, a parent that is only the path to a submodule does not."""
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
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules} - {name}
    return graph


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of `module`."""
    best, level = -1, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level >= 0, f"{module} is in no layer: add its package to LAYERS"
    return level


def against_the_direction(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                  for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def test_every_import_goes_down_the_layers():
    graph = _imports()
    assert {"cairn.config.sections", "cairn.checkpoint.load", "cairn.training.loop"} <= set(graph)
    assert against_the_direction(graph) == []


def test_the_top_level_holds_only_the_api_and_the_version():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "version.py"]


def test_the_layer_check_finds_an_import_that_climbs():
    """Guard: the direction check fails on a low module importing a high one, parent packages included."""
    climbs = {"cairn.util.files": {"cairn.training.loop"}, "cairn.training.loop": {"cairn"},
              "cairn.model.ops": {"cairn.util.errors"}}
    found = against_the_direction(climbs)
    assert len(found) == 2 and "cairn.util.files (layer 0) imports cairn.training.loop" in found[1]


def no_cycle(graph: dict[str, set[str]]) -> None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_import_cycles_among_cairn_modules():
    no_cycle(_imports())


def test_the_cycle_check_finds_a_cycle():
    with pytest.raises(AssertionError, match="import cycle: a -> b -> c -> a"):
        no_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})


def _loaded_after(imports: str) -> list[str]:
    code = f"import sys, {imports}; print(sorted(m for m in sys.modules if m.startswith('cairn')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return eval(out)


@pytest.mark.slow
def test_loading_evaluating_generating_exporting_and_serving_never_import_the_trainer():
    loaded = _loaded_after("cairn.checkpoint.load, cairn.inference.generate, cairn.export.hf, cairn.eval.run, "
                           "cairn.checkpoint.store, cairn.serve, cairn.serve.app, cairn.serve.engine")
    assert [m for m in loaded if m.startswith("cairn.training")] == []


def test_config_imports_neither_data_nor_training():
    loaded = _loaded_after("cairn.config.sections")
    assert "cairn.config.sections" in loaded
    assert not any(m.startswith(("cairn.data", "cairn.tokenizer.learn", "cairn.training")) for m in loaded), loaded


@pytest.mark.slow
def test_the_model_does_not_import_precision_measuring():
    loaded = _loaded_after("cairn.model.transformer")
    assert "cairn.runtime.precision" not in loaded, loaded
