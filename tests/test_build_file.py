"""BUILD stays honest: every package module is in a py_library and every test file has a py_test.

Bazel cannot build here (its Python rules are fetched from the network), so this test is what keeps the
Bazel targets in step with the tree; pytest is the test runner.
"""

import ast
import glob
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _targets():
    with open(os.path.join(REPO_ROOT, "BUILD")) as handle:
        tree = ast.parse(handle.read(), filename="BUILD")  # Starlark BUILD files are Python syntax.
    targets = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id not in ("py_library", "py_test", "py_binary"):
                continue
            arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            targets[arguments["name"]] = (node.func.id, arguments)
    return targets


def test_every_module_is_in_a_library_and_every_test_has_a_target():
    targets = _targets()
    library_sources = {
        src for kind, args in targets.values() if kind == "py_library" for src in args.get("srcs", []) if src.startswith("keras_wssi/")
    }
    modules = {os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "keras_wssi", "**", "*.py"), recursive=True)}
    assert modules - library_sources == set(), "modules missing from BUILD py_library srcs"
    assert library_sources - modules == set(), "BUILD lists files that do not exist"
    tests = {os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "tests", "test_*.py"))}
    test_mains = {args["main"] for kind, args in targets.values() if kind == "py_test"}
    assert tests == test_mains, f"py_test targets differ from test files: {sorted(tests ^ test_mains)}"
    for kind, args in targets.values():
        if kind != "py_test":
            continue
        # A test that imports helpers from another test file must carry that file in its srcs.
        with open(os.path.join(REPO_ROOT, args["main"])) as handle:
            tree = ast.parse(handle.read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        for module in imported:
            if module.startswith("test_"):
                assert f"tests/{module}.py" in args["srcs"], (args["name"], module)
    for kind, args in targets.values():
        for dependency in args.get("deps", []):
            if dependency.startswith(":"):
                assert dependency[1:] in targets, f"unknown dependency {dependency}"
    scripts = {os.path.relpath(p, REPO_ROOT) for pattern in ("examples/*.py", "benchmarks/*.py") for p in glob.glob(os.path.join(REPO_ROOT, pattern))}
    declared = {src for kind, args in targets.values() if kind in ("py_binary", "py_library") for src in args.get("srcs", [])}
    assert scripts <= declared, f"scripts without a target: {sorted(scripts - declared)}"
    for path in scripts:
        with open(os.path.join(REPO_ROOT, path)) as handle:
            runnable = "__main__" in handle.read()
        kinds = {kind for kind, args in targets.values() if path in args.get("srcs", [])}
        assert kinds == ({"py_binary"} if runnable else {"py_library"}), (path, kinds)
