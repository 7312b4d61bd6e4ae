"""Counts of how the code is put together, on a source tree (the folder holding cairn/):

    python benchmarks/scripts/skeleton_counts.py src
    git archive 04bf875 src | tar -x -C /tmp/before && python benchmarks/scripts/skeleton_counts.py /tmp/before/src

Annotations typed a bare `Any` in training/, functions that take `trainer`, where the checkpoint's
counters are declared, `format ==` string tests, top-level modules, and the files that define a
sampling default. Imports against the layers are `tests/test_structure.py`'s check."""
import ast
import re
import sys
from pathlib import Path

root = Path(sys.argv[1]) / "cairn"
py = list(root.rglob("*.py"))


def rel(p: Path) -> str:
    return str(p.relative_to(root))


def any_typed(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            anns = []
            if isinstance(node, ast.AnnAssign):
                anns.append(node.annotation)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs + node.args.posonlyargs
                anns += [a.annotation for a in args if a.annotation is not None]
                if node.returns is not None:
                    anns.append(node.returns)
            for a in anns:
                text = ast.unparse(a)
                if "Any" in re.findall(r"\w+", text) and not text.startswith(("dict[", "Callable", "list[", "tuple[")):
                    n += 1
    return n

training = [p for p in py if rel(p).startswith("training/")]
print("fields/params/returns annotated Any (bare or Optional[Any]) in training/:", any_typed(training))
untyped_trainer = sum(len(re.findall(r"def \w+\((?:self, )?trainer\b", p.read_text())) for p in py)
print("functions taking `trainer`:", untyped_trainer)
decl = [rel(p) for p in py if re.search(r"^\s*batch_in_epoch\b.*(=|:)", p.read_text(), re.M)
        or re.search(r'"batch_in_epoch": _whole', p.read_text())]
print("places declaring the checkpoint state (batch_in_epoch declared):", len(decl), decl)
BUDGET = (r"deadline *[:=]|def replan|def end_reserve|def margin_s|overhead_s *[:=]|PACE_WINDOW|def plan_for_budget|"
          r"def fit\(|def measure\((trainer|\*)|def wider_for_budget|budget_s: float|time_budget and")
budget = sorted({rel(p) for p in py if re.search(BUDGET, p.read_text())})
print("files holding budget logic:", len(budget), budget)
fmt = [(rel(p), line.strip()) for p in py for line in p.read_text().splitlines()
       if re.search(r"format (==|!=) \"", line)]
print("format ==/!= string tests:", len(fmt), fmt)
top = sorted(p.name for p in root.glob("*.py"))
print("top-level modules:", len(top), top)
S = r"temperature|top_k|top_p|max_new_tokens|repetition_penalty"
DEFAULT = (rf"\b({S})(: *(int|float))? *= *(field\(default=|opt\()?-?[0-9]|"
           r"\"--(temperature|top-k|top-p|max-new-tokens|repetition-penalty)\"[^)]*default=")
files = sorted({rel(p) for p in py if re.search(DEFAULT, p.read_text())})
print("files defining a sampling default:", len(files), files)
