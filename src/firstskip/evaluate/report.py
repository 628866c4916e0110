"""The report of an evaluation: results.json, a markdown table and three plots, from the results dict alone.

Plots use matplotlib's object API (`Figure`, Agg canvas), so no global pyplot state or display is
touched; every file is written atomically, like the run folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from firstskip import artifacts
from firstskip.metrics import TASK_METRICS, canonical_task

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PARETO_PNG, LAYERS_PNG, COUNTS_PNG = "pareto.png", "layer_usage.png", "skip_counts.png"


def write_report(results: dict[str, Any], out: Path) -> None:
    """results.json, results.md, pareto.png, layer_usage.png and skip_counts.png in ``out``."""
    artifacts.write_json(out / RESULTS_JSON, results)
    artifacts.write_text(out / RESULTS_MD, markdown(results))
    datasets = results["datasets"]
    plot_pareto(datasets, out / PARETO_PNG)
    plot_layer_usage({_label(name, d): d["layer_keep_rate"] for name, d in datasets.items()},
                     results["protected"], out / LAYERS_PNG)
    plot_skip_counts({_label(name, d): (d["budget"]["first_skip_counts"], d["budget"]["k"])
                      for name, d in datasets.items()}, results["num_layers"], out / COUNTS_PNG)


def _label(name: str, d: Mapping[str, Any]) -> str:
    return f"{name} ({d['task']})"


# -- markdown -------------------------------------------------------------------------------

def _cell(m: Mapping[str, float]) -> str:
    return f"{m['score']:.1f} [{m['low']:.1f}, {m['high']:.1f}]"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(results: dict[str, Any]) -> str:
    """Scores with 95% intervals, skip ratios and measured speed: a summary, then one table per dataset."""
    d = results["decision"]
    rule = (f"budget {d['skip_ratio']}" if d["decision"] == "budget" else f"threshold {d['threshold']}")
    lines = [f"# Evaluation of `{results['run']}`", "",
             f"Base model `{results['base_model']}`, {results['num_layers']} layers (protected: "
             f"{', '.join(map(str, results['protected']))}); FiRST decides by {rule}, prefill {d['prefill']}. "
             f"Greedy decoding. Intervals are 95% bootstrap intervals.", "",
             f"Speed ({results['settings']['speed_items']} prompts per dataset): {results['timing']}. "
             f"Threads: {results['environment']['threads']}.", ""]
    lines += ["## Summary: primary metric [95% interval] / decode speedup vs full", "", *summary(results)]
    kept = kept_table(results)
    if kept:
        lines += ["", "## Quality kept: primary metric over the same weights with every layer "
                      "[paired 95% interval]", "", *kept]
    for name, ds in results["datasets"].items():
        lines += ["", *_dataset_table(name, ds)]
    return "\n".join(lines) + "\n"


def summary(results: dict[str, Any]) -> list[str]:
    """Methods x datasets: primary metric [95% interval] / decode speedup vs full, as markdown lines."""
    datasets = results["datasets"]
    methods = list(dict.fromkeys(m for ds in datasets.values() for m in ds["methods"]))
    lines = ["| method | " + " | ".join(f"{n} ({ds['primary_metric']})" for n, ds in datasets.items()) + " |",
             "|---" * (len(datasets) + 1) + "|"]
    for m in methods:
        cells = []
        for ds in datasets.values():
            r = ds["methods"].get(m)
            cells.append("–" if r is None else f"{_cell(r['metrics'][ds['primary_metric']])} / "
                                               f"{_num(r['speed']['decode_speedup'], '.2f')}×")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def kept_table(results: dict[str, Any]) -> list[str]:
    """Rows "method / reference", datasets as columns: the paired ratios `runner` adds as ``vs``
    (empty when no reference ran)."""
    datasets = results["datasets"]
    pairs = list(dict.fromkeys((m, ref) for ds in datasets.values() for m, r in ds["methods"].items()
                               for ref in r.get("vs", {})))
    if not pairs:
        return []
    lines = ["| method / reference | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for m, ref in pairs:
        cells = [_ratio(ds["methods"].get(m, {}).get("vs", {}).get(ref)) for ds in datasets.values()]
        lines.append(f"| {m} / {ref} | " + " | ".join(cells) + " |")
    return lines


def _ratio(r: Mapping[str, float] | None) -> str:
    return "–" if r is None else f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def _dataset_table(name: str, ds: dict[str, Any]) -> list[str]:
    metrics = TASK_METRICS[canonical_task(ds["task"])]
    b = ds["budget"]
    lines = [f"## {name} ({ds['task']}, {ds['items']} items, max_new_tokens {ds['max_new_tokens']})", "",
             f"FiRST skipped {b['first_mean_skipped']:.2f} layers per item on average, so static baselines "
             f"skip k = {b['k']}.", "",
             "| method | k | " + " | ".join(metrics) + " | mean skipped | skip ratio | decode tok/s | "
             "speedup | TTFT s | TTFT vs full | batched speedup |",
             "|---" * (len(metrics) + 9) + "|"]
    for m, r in ds["methods"].items():
        s, sp = r["skip"], r["speed"]
        k = "" if s["k"] is None else str(s["k"])
        lines.append(f"| {m} | {k} | " + " | ".join(_cell(r["metrics"][x]) for x in metrics) +
                     f" | {s['mean_skipped']:.2f} | {s['skip_ratio']:.3f} | {_num(sp['decode_tok_s'], '.1f')} | "
                     f"{_num(sp['decode_speedup'], '.2f')} | {_num(sp['ttft_s'], '.3f')} | "
                     f"{_num(sp['ttft_vs_full'], '.2f')} | {_num(r['batched']['decode_speedup'], '.2f')} |")
    lines += [f"- {m}: not run ({why})" for m, why in ds["not_run"].items()]
    if "first_matches_decisions" in ds:
        lines.append(f"- FiRST's skip sets during generation equal its budget-setting decisions on "
                     f"{100 * ds['first_matches_decisions']:.0f}% of items.")
    static = {m: r["skip"]["layers"] for m, r in ds["methods"].items() if r["skip"]["layers"] is not None}
    lines += [f"- {m} skips layers {layers}" for m, layers in static.items()]
    return lines


# -- plots ----------------------------------------------------------------------------------

def _save(fig: Any, path: Path) -> None:
    artifacts.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _grid(n: int, cell: tuple[float, float]) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cell[0] * cols, cell[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_pareto(datasets: Mapping[str, Any], path: Path) -> None:
    """Quality (primary metric, 95% interval) against measured decode speedup, one panel per dataset."""
    fig, axes = _grid(max(len(datasets), 1), (5.0, 4.0))
    for ax, (name, ds) in zip(axes, datasets.items()):
        metric = ds["primary_metric"]
        for m, r in ds["methods"].items():
            x, score = r["speed"]["decode_speedup"], r["metrics"][metric]
            if x is None:
                continue
            first = m.startswith("first")
            ax.errorbar(x, score["score"], yerr=[[score["score"] - score["low"]], [score["high"] - score["score"]]],
                        fmt="*" if first else "o", markersize=11 if first else 6, capsize=3,
                        color="tab:red" if first else "tab:blue")
            ax.annotate(m, (x, score["score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(1.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set(title=f"{name} ({ds['task']})", xlabel="decode speedup vs full (measured)", ylabel=metric)
    _save(fig, path)


def plot_layer_usage(rows: Mapping[str, Sequence[float]], protected: Sequence[int], path: Path) -> None:
    """Tasks x layers: how often FiRST keeps each layer (protected layers are marked with a dot)."""
    from matplotlib.figure import Figure

    labels = list(rows)
    num_layers = len(next(iter(rows.values())))
    fig = Figure(figsize=(max(6.0, 0.32 * num_layers + 2.5), 0.5 * len(labels) + 1.6))
    ax = fig.subplots()
    image = ax.imshow([list(rows[label]) for label in labels], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(num_layers), [str(i) for i in range(num_layers)], fontsize=7)
    ax.scatter(list(protected) * len(labels), [r for r in range(len(labels)) for _ in protected],
               marker=".", color="white", s=12)
    ax.set(xlabel="layer (white dot: protected, never skipped)", title="FiRST layer usage: fraction of items keeping each layer")
    fig.colorbar(image, ax=ax, label="keep rate")
    _save(fig, path)


def plot_skip_counts(counts: Mapping[str, tuple[Sequence[int], int]], num_layers: int, path: Path) -> None:
    """Histogram of FiRST's per-example skip counts per dataset; the dashed line is the equal budget k."""
    fig, axes = _grid(max(len(counts), 1), (4.5, 3.2))
    bins = [b - 0.5 for b in range(num_layers + 2)]
    for ax, (label, (values, k)) in zip(axes, counts.items()):
        ax.hist(values, bins=bins, color="tab:red", alpha=0.8)
        ax.axvline(k, color="black", linestyle="--", linewidth=1, label=f"k = {k}")
        ax.set(title=label, xlabel="layers skipped per item", ylabel="items")
        ax.legend(fontsize=7)
    _save(fig, path)

