"""The package's import layering, derived from its layout and its own imports (no hand-kept list of modules).

Every module is mapped to its unit: a top-level module (`keras_wssi/linalg.py` → `linalg`) or a subpackage
(`keras_wssi/penalties/*.py` → `penalties`). The imports between units must form a DAG — that DAG *is* the
layer order, and the test prints it — so no unit imports anything that (directly or not) imports it back. On
top of that, the rules the design states:
- every import of keras_wssi is at module level (a function-level import is how a cycle hides);
- the readers (`analysis`, `evaluation`) never import the training side (`penalties`, `regularizers`, `models`,
  `architectures`, `data`, `callbacks`, `experiments`), and the training step's parts (`penalties`, `regularizers`,
  `models`, `architectures`, `data`) never import the readers; `callbacks` and `experiments` sit above both.
"""

import ast
import os

from conftest import REPO_ROOT

PACKAGE = "keras_wssi"
READERS = {"analysis", "evaluation"}
TRAINING_SIDE = {"penalties", "regularizers", "models", "architectures", "data", "callbacks", "experiments"}
# What a training step is made of; callbacks and experiments sit above both sides (they measure with analysis).
TRAINING_CORE = {"penalties", "regularizers", "models", "architectures", "data"}


def _modules():
    root = os.path.join(REPO_ROOT, PACKAGE)
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
                yield (module[: -len(".__init__")] if module.endswith(".__init__") else module), path


def _unit(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__.


def _imports(path, module):
    """`(target module, line, outside any function)` for every keras_wssi import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    in_function = set()
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(node) for node in ast.walk(scope))
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] if base == PACKAGE else [base]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                yield target, node.lineno, id(node) not in in_function


def _unit_graph():
    edges, function_level = {}, []
    for module, path in _modules():
        unit = _unit(module)
        edges.setdefault(unit, set())
        for target, line, at_top in _imports(path, module):
            if not at_top:
                function_level.append(f"{os.path.relpath(path, REPO_ROOT)}:{line} imports {target} inside a function")
            target_unit = _unit(target)
            if unit is not None and target_unit is not None and target_unit != unit:
                edges[unit].add(target_unit)
    edges.pop(None, None)
    return edges, function_level


def _layer_order(edges):
    """Kahn's algorithm: the units from the bottom layer up; raises on a cycle, naming it."""
    remaining = {unit: set(targets) & set(edges) for unit, targets in edges.items()}
    order = []
    while remaining:
        ready = sorted(unit for unit, targets in remaining.items() if not targets)
        if not ready:
            raise AssertionError(f"Import cycle among {sorted(remaining)}: {remaining}")
        order.append(ready)
        for unit in ready:
            del remaining[unit]
        for targets in remaining.values():
            targets.difference_update(ready)
    return order


def test_no_cycles_and_every_import_at_module_level():
    edges, function_level = _unit_graph()
    assert not function_level, "keras_wssi imports inside functions (hidden cycles):\n" + "\n".join(function_level)
    order = _layer_order(edges)
    print("Layers, bottom first:", " < ".join("{" + ", ".join(layer) + "}" for layer in order))
    # The tensor-math units sit at the bottom: they import nothing of keras_wssi above themselves.
    # `backend` (the per-backend autodiff primitives) is at the bottom too: the math above takes its gradients from it.
    for low in ("validation", "labels", "backend"):
        assert not edges[low], f"{low} must not import other keras_wssi modules, imports {sorted(edges[low])}"
    assert edges["linalg"] <= {"validation", "backend"}, f"linalg imports {sorted(edges['linalg'])}"


def test_readers_and_training_side_do_not_import_each_other():
    edges, _ = _unit_graph()
    violations = [
        f"{unit} -> {target}"
        for unit, targets in edges.items()
        for target in targets
        if (unit in READERS and target in TRAINING_SIDE) or (unit in TRAINING_CORE and target in READERS)
        or (unit == "analysis" and target == "evaluation")
    ]
    assert not violations, "Upward imports across the reader/trainer line: " + ", ".join(sorted(violations))


def test_the_check_catches_a_cycle_and_a_function_level_import(tmp_path):
    # The graph code itself, on a made-up package: a cycle is reported, an acyclic graph is ordered.
    try:
        _layer_order({"a": {"b"}, "b": {"a"}, "c": set()})
    except AssertionError as error:
        assert "cycle" in str(error)
    else:
        raise AssertionError("a cycle went unnoticed")
    assert _layer_order({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == [["b"], ["a"], ["c"]]
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    from keras_wssi import models\n    return models\n")
    found = list(_imports(str(source), "keras_wssi.module"))
    assert found == [("keras_wssi.models", 4, False)]
