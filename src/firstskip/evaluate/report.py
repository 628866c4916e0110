"""The report of an evaluation: results.json, a markdown table and three plots, from the results dict alone.

`pareto_points` and `plot_pareto` also draw several evaluations together (`firstskip.evaluate.pareto`):
a method's operating points become a curve of quality against measured decode saving.

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
    results["mixed"] = mixed(results)
    artifacts.write_json(out / RESULTS_JSON, results)
    artifacts.write_text(out / RESULTS_MD, markdown(results))
    datasets = results["datasets"]
    plot_pareto(pareto_points([results]), out / PARETO_PNG)
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
             f"Greedy decoding. Intervals are 95% bootstrap intervals.", "", *_calibrated(results),
             f"Speed ({results['settings']['speed_items']} prompts per dataset): {results['timing']}. "
             f"Threads: {results['environment']['threads']}.", ""]
    lines += [f"Budgets: {results['budgets']}.", "",
              "## Summary: primary metric [95% interval] / decode saving (token-weighted) / latency per request",
              "", *summary(results)]
    kept = kept_table(results)
    if kept:
        lines += ["", "## Quality kept: primary metric over the same weights with every layer "
                      "[paired 95% interval]", "", *kept]
    for name, ds in results["datasets"].items():
        lines += ["", *_dataset_table(name, ds)]
    return "\n".join(lines) + "\n"


def _calibrated(results: dict[str, Any]) -> list[str]:
    """What the run's threshold was calibrated for on held-out training prompts, to read beside the
    saving the test sets show."""
    c = results.get("calibration")
    if not c or c["threshold"] != results["decision"]["threshold"]:
        return []
    target = next((f"{name} {c[key]}" for key, name in (("saving_target", "decode saving"),
                                                        ("skip_target", "skip ratio"), ("max_drop", "max drop"))
                   if c.get(key) is not None), "its threshold")
    saving = "" if c.get("saving") is None else f", decode saving {c['saving']:.3f}"
    return [f"The threshold was calibrated for {target} on {c['examples']} held-out training prompts "
            f"(there: skip ratio {c['skip_ratio']:.3f}{saving}).", ""]


def summary(results: dict[str, Any]) -> list[str]:
    """Methods x datasets (and the mixed workload): primary metric [95% interval] / token-weighted decode
    saving / latency per request, as markdown lines."""
    datasets = results["datasets"]
    mix = mixed(results) if len(datasets) > 1 else None
    methods = list(dict.fromkeys(m for ds in datasets.values() for m in ds["methods"]))
    header = [f"{n} ({ds['primary_metric']})" for n, ds in datasets.items()] + ["mixed workload"] * bool(mix)
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for m in methods:
        cells = []
        for ds in datasets.values():
            r = ds["methods"].get(m)
            cells.append("–" if r is None else f"{_cell(r['metrics'][ds['primary_metric']])} / "
                                               f"{_budget(r['skip']['decode_saving'], r['speed']['latency_s'])}")
        if mix is not None:
            w = mix["methods"].get(m)
            cells.append("–" if w is None else f"{_num(w['quality'], '.2f')} of {mix['reference']} / "
                                               f"{_budget(w['decode_saving'], w['latency_s'])}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _budget(saving: float, latency: float | None) -> str:
    return f"saves {100 * saving:.1f}% / {_num(latency, '.2f')} s"


def mixed(results: dict[str, Any]) -> dict[str, Any]:
    """The datasets' test items together, as a deployment sees them, per method that ran on all of them:
    token-weighted decode saving over all their decode steps, mean latency per request over all items,
    and quality as the items-weighted mean of each dataset's primary metric over the reference's
    (lora-only where it ran, else full), since the tasks' metrics differ."""
    datasets = list(results["datasets"].values())
    names = dict.fromkeys(m for ds in datasets for m in ds["methods"])
    ran = [m for m in names if all(m in ds["methods"] for ds in datasets)]
    reference = next((ref for ref in ("lora-only", "full") if ref in ran), None)
    out: dict[str, Any] = {"reference": reference, "items": sum(ds["items"] for ds in datasets), "methods": {}}
    for m in ran:
        rs = [(ds, ds["methods"][m]) for ds in datasets]
        steps = sum(r["skip"]["decode_steps"] for _, r in rs)
        latencies = [(ds["items"], r["speed"]["latency_s"]) for ds, r in rs]
        timed = all(t is not None for _, t in latencies)
        out["methods"][m] = {
            "decode_saving": sum(r["skip"]["saved_layer_steps"] for _, r in rs) / (results["num_layers"] * steps)
            if steps else 0.0,
            "skip_ratio": sum(ds["items"] * r["skip"]["skip_ratio"] for ds, r in rs) / out["items"],
            "latency_s": sum(n * t for n, t in latencies) / out["items"] if timed else None,
            "quality": None if reference is None else _relative(rs, reference, out["items"])}
    return out


def _relative(rs: list[tuple[dict[str, Any], dict[str, Any]]], reference: str, items: int) -> float | None:
    total = 0.0
    for ds, r in rs:
        metric = ds["primary_metric"]
        below = ds["methods"][reference]["metrics"][metric]["score"]
        if below == 0:
            return None
        total += ds["items"] * r["metrics"][metric]["score"] / below
    return total / items


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
             "| method | k | " + " | ".join(metrics) + " | mean skipped | skip ratio | decode saving | "
             "latency s | decode tok/s | speedup | TTFT s | TTFT vs full | batched speedup (bound) |",
             "|---" * (len(metrics) + 11) + "|"]
    for m, r in ds["methods"].items():
        s, sp, b = r["skip"], r["speed"], r["batched"]
        k = "" if s["k"] is None else str(s["k"])
        flag = " †" if b["above_bound"] else ""
        lines.append(f"| {m} | {k} | " + " | ".join(_cell(r["metrics"][x]) for x in metrics) +
                     f" | {s['mean_skipped']:.2f} | {s['skip_ratio']:.3f} | {s['decode_saving']:.3f} | "
                     f"{_num(sp['latency_s'], '.2f')} | {_num(sp['decode_tok_s'], '.1f')} | "
                     f"{_num(sp['decode_speedup'], '.2f')} | {_num(sp['ttft_s'], '.3f')} | "
                     f"{_num(sp['ttft_vs_full'], '.2f')} | {_num(b['decode_speedup'], '.2f')}{flag} "
                     f"({_num(b['work_bound'], '.2f')}) |")
    if any(r["batched"]["above_bound"] for r in ds["methods"].values()):
        lines.append("- †: batched speedup above its work bound 1 / (1 - decode saving): not skipping's doing "
                     "(timing noise, or outputs that end at other times within a batch)")
    if "oracle" in ds:
        o = ds["oracle"]
        lines.append(f"- oracle: FiRST's most common set on {o['prompts']} held-out training prompts of this task "
                     f"({100 * o['share']:.0f}% of them) for every item; it needs the task label")
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


MIXED = "mixed workload"
Point = tuple[float, float, float | None, float | None]  # (decode saving, quality, interval low, high)


def pareto_points(evaluations: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[Point]]]:
    """Panel (each dataset, and the mixed workload) -> method family -> its operating points, sorted by
    decode saving. A family is a method's name up to ``:`` (the rival ``shortgpt+lora:runs/x`` belongs
    to ``shortgpt+lora``), so the same method at several budgets, in one evaluation or several, is one
    curve. Per dataset the quality is the primary metric with its 95% interval; on the mixed workload
    it is the quality kept over the reference (`mixed`)."""
    panels: dict[str, dict[str, list[Point]]] = {}
    for results in evaluations:
        for name, ds in results["datasets"].items():
            panel = panels.setdefault(f"{name} ({ds['primary_metric']})", {})
            for m, r in ds["methods"].items():
                score = r["metrics"][ds["primary_metric"]]
                panel.setdefault(m.split(":")[0], []).append(
                    (r["skip"]["decode_saving"], score["score"], score["low"], score["high"]))
        mix = mixed(dict(results))
        kept = {m: r for m, r in mix["methods"].items() if r["quality"] is not None}
        if len(results["datasets"]) > 1 and kept:
            panel = panels.setdefault(f"{MIXED} (quality kept over {mix['reference']})", {})
            for m, r in kept.items():
                panel.setdefault(m.split(":")[0], []).append((r["decode_saving"], r["quality"], None, None))
    return {p: {f: sorted(points) for f, points in families.items()} for p, families in panels.items()}


def interpolate(points: Sequence[Point], saving: float) -> float | None:
    """A curve's quality at ``saving``, linear between its two neighbouring points; None outside its range."""
    for (x0, y0, *_), (x1, y1, *_) in zip(points, points[1:]):
        if x0 <= saving <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (saving - x0) / (x1 - x0)
    return next((y for x, y, *_ in points if x == saving), None)  # a lone point


def equal_saving_table(panels: Mapping[str, Mapping[str, Sequence[Point]]]) -> dict[str, Any]:
    """Per panel, each family's quality at every saving some family was measured at (interpolated where
    its own points do not line up; None outside its measured range): rivals at equal decode work."""
    table: dict[str, Any] = {}
    for panel, families in panels.items():
        savings = sorted({p[0] for points in families.values() for p in points})
        table[panel] = {"savings": savings,
                        "quality": {f: [interpolate(points, x) for x in savings] for f, points in families.items()}}
    return table


def plot_pareto(panels: Mapping[str, Mapping[str, Sequence[Point]]], path: Path) -> None:
    """Quality against measured token-weighted decode saving, one panel per dataset and the mixed
    workload; a method family's points joined in order of saving (95% intervals where known)."""
    fig, axes = _grid(max(len(panels), 1), (5.0, 4.0))
    fig.set_layout_engine("constrained")
    for ax, (panel, families) in zip(axes, panels.items()):
        for family, points in families.items():
            first = family.startswith("first")
            xs, ys = [100 * p[0] for p in points], [p[1] for p in points]
            line, = ax.plot(xs, ys, marker="*" if first else "o", markersize=11 if first else 6,
                            linewidth=2 if first else 1, label=family)
            for (x, y, low, high) in points:
                if low is not None:
                    ax.errorbar(100 * x, y, yerr=[[y - low], [high - y]], color=line.get_color(), capsize=3)
        ax.set(title=panel, xlabel="decode saving, token-weighted (% of layer executions)", ylabel="quality")
        ax.legend(fontsize=6)
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

