r"""Writes docs/api.md, the API reference, from the public names (`__all__`) and their docstrings.

    python tools/generate_api_docs.py
"""

import importlib
import inspect
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODULES = [
    "keras_wssi",
    "keras_wssi.models",
    "keras_wssi.penalties",
    "keras_wssi.regularizers",
    "keras_wssi.callbacks",
    "keras_wssi.analysis",
    "keras_wssi.evaluation",
    "keras_wssi.experiments",
    "keras_wssi.structure",
    "keras_wssi.margin_bounds",
    "keras_wssi.context",
    "keras_wssi.backend",
    "keras_wssi.linalg",
    "keras_wssi.labels",
    "keras_wssi.validation",
    "keras_wssi.distribute",
    "keras_wssi.data",
    "keras_wssi.architectures",
    "keras_wssi.xla",
]


def _signature(obj):
    try:
        target = obj.__init__ if inspect.isclass(obj) else obj
        signature = inspect.signature(target)
        parameters = [p for name, p in signature.parameters.items() if name != "self"]
        return "(" + ", ".join(str(p) for p in parameters) + ")"
    except (TypeError, ValueError):
        return ""


def main():
    lines = ["# API reference", "", "Generated from the docstrings by `tools/generate_api_docs.py`.", ""]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", [])
        lines += [f"## `{module_name}`", "", inspect.cleandoc(module.__doc__ or ""), ""]
        for name in names:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{kind} {module_name}.{name}{_signature(obj)}`", "", inspect.cleandoc(obj.__doc__ or "(no docstring)"), ""]
    with open(os.path.join(REPO_ROOT, "docs", "api.md"), "w") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
