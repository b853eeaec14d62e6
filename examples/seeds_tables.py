"""The tables of `examples/seeds.py`: per configuration, mean ± a Student-t interval over seeds, Welch tests against
the baseline, gradient-masking checks per seed, and whether the seeds really differ. No flags here, so tests and
other scripts can import it next to `examples/train.py` (absl flags are global)."""

from keras_wssi.evaluation import statistics

__all__ = ["METRICS", "aggregate", "markdown"]

METRICS = {
    "test_accuracy": ("test acc.", "{:.4f}"),
    "generalization_gap_accuracy": ("gap (acc.)", "{:.4f}"),
    "jacobian_spectral_norm_mean": ("mean σ_max(J)", "{:.2f}"),
    "fgsm_accuracy": ("FGSM", "{:.3f}"),
    "pgd_accuracy": ("PGD", "{:.3f}"),
    "strong_pgd_accuracy": ("PGD, more steps + restarts", "{:.3f}"),
    "white_box_accuracy": ("white-box worst case", "{:.3f}"),
    "large_epsilon_accuracy": ("PGD at huge ε", "{:.3f}"),
    "square_accuracy": ("Square", "{:.3f}"),
    "transfer_accuracy": ("transfer", "{:.3f}"),
    "masking_checks_passed": ("masking checks passed", "{:.2f}"),
}


def aggregate(configs, runs, baseline, confidence):
    """Per configuration: `statistics.summarize` of its seeds; Welch tests against `baseline`; seed check."""
    table = {}
    for name, _ in configs:
        table[name] = {"summary": statistics.summarize([r["metrics"] for r in runs[name]], confidence)}
        fingerprints = [r["weights_sha256"] for r in runs[name]]
        table[name]["seeds_differ"] = len(set(fingerprints)) == len(fingerprints)
        if name != baseline:
            tests = {}
            for metric in table[name]["summary"]:
                base_values = [r["metrics"].get(metric) for r in runs[baseline]]
                if any(v is None for v in base_values):
                    continue
                tests[metric] = statistics.welch_test([r["metrics"][metric] for r in runs[name]], base_values)
            table[name]["welch_vs_baseline"] = tests
        if all("diagnostics" in r for r in runs[name]):
            table[name]["masking_verdicts"] = [r["diagnostics"]["summary"] for r in runs[name]]
            counts = {}
            for r in runs[name]:
                for check in r["diagnostics"]["checks"]:
                    passed, ran = counts.get(check["check"], (0, 0))
                    if check["passed"] is not None:
                        counts[check["check"]] = (passed + bool(check["passed"]), ran + 1)
                    else:
                        counts.setdefault(check["check"], (0, 0))
            table[name]["masking_checks"] = {k: {"passed": p, "ran": n} for k, (p, n) in counts.items()}
    return table


def markdown(results):
    lines = []
    for dataset, content in results["datasets"].items():
        table, baseline = content["table"], content["baseline"]
        metrics = [m for m in METRICS if any(m in row["summary"] for row in table.values())]
        lines += [f"### {dataset}: mean ± {int(results['confidence'] * 100)}% Student-t interval over "
                  f"{results['seeds']} seeds", ""]
        lines.append("| configuration | " + " | ".join(METRICS[m][0] for m in metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for name, row in table.items():
            cells = []
            for metric in metrics:
                entry = row["summary"].get(metric)
                fmt = METRICS[metric][1]
                cells.append("–" if entry is None
                             else f"{fmt.format(entry['mean'])} ± {fmt.format(entry['half_width'])}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"Welch's t-test against `{baseline}` (difference, two-sided p):", ""]
        lines.append("| configuration | " + " | ".join(METRICS[m][0] for m in metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for name, row in table.items():
            if name == baseline:
                continue
            cells = []
            for metric in metrics:
                test = row.get("welch_vs_baseline", {}).get(metric)
                cells.append("–" if test is None else f"{test['difference']:+.3g} (p={test['p_value']:.2g})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        checked = {name: row["masking_checks"] for name, row in table.items() if "masking_checks" in row}
        if checked:
            checks = list(next(iter(checked.values())))
            lines += ["", "Gradient-masking checks (keras_wssi/evaluation/diagnostics.py), seeds passing / seeds run:",
                      "", "| configuration | " + " | ".join(checks) + " | verdict |",
                      "|---|" + "---|" * (len(checks) + 1)]
            for name, counts in checked.items():
                cells = [f"{counts[c]['passed']}/{counts[c]['ran']}" if counts[c]["ran"] else "skipped" for c in checks]
                clean = all(counts[c]["passed"] == counts[c]["ran"] for c in checks)
                lines.append(f"| {name} | " + " | ".join(cells) + " | " + ("passes" if clean else "**flagged**") + " |")
        differ = all(row["seeds_differ"] for row in table.values())
        lines += ["", "Seeds differ (distinct weights in every configuration): " + ("yes" if differ else "**NO**"), ""]
    return "\n".join(lines) + "\n"
