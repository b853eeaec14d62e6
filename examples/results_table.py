r"""Collects the `metrics.json` files written by examples/train.py into one Markdown table.

    python examples/results_table.py runs/weight_penalties/*
"""

import json
import os
import sys

COLUMNS = [
    ("dataset", "data set", "{}"),
    ("run", "run", "{}"),
    ("test_accuracy", "test acc.", "{:.4f}"),
    ("train_accuracy", "train acc.", "{:.4f}"),
    ("generalization_gap_accuracy", "gap (acc.)", "{:.4f}"),
    ("generalization_gap_loss", "gap (loss)", "{:.4f}"),
    ("input_gradient_norm_mean", "mean ‖J‖₂ (test)", "{:.2f}"),
    ("input_gradient_bound_spectral", "∏‖W‖₂ bound", "{:.3g}"),
]


def load(run_dirs):
    rows = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{run_dir}: no metrics.json (did examples/train.py finish there?)")
        with open(path) as handle:
            metrics = json.load(handle)
        metrics["run"] = os.path.basename(os.path.normpath(run_dir))
        rows.append(metrics)
    return rows


def markdown(rows):
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "–" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    print(markdown(load(argv[1:])))


if __name__ == "__main__":
    main(sys.argv)
