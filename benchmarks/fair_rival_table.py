"""FiRST against ShortGPT + LoRA at equal token-weighted decode saving: the tables of docs/results.md.

Usage: python benchmarks/fair_rival_table.py [--evals out/eval] [--seeds 0 1 2] [--out FILE.json]

Reads `benchmarks/fair_rival.sh`'s evaluations out/eval/fair-sK-wNN (LoRA-only, FiRST calibrated on held-out
training prompts to the rival's token-weighted saving NN/100, and the rival shortgpt+lora trained under
round(NN/100 x 30) layers), re-scores every stored prediction item by item and prints, per seed and budget:
- per task: each method's primary metric and measured decode saving, FiRST minus the rival with a paired
  95% bootstrap interval (the same items resampled for both), and FiRST's quality interpolated between its two
  calibrations at the rival's measured saving (none where the rival's saving lies outside FiRST's range);
- the mixed workload (the three test sets together): quality kept over LoRA-only (items-weighted mean of the
  tasks' ratios), the decode saving over all decode steps, and FiRST minus the rival with a paired interval
  (items resampled within each task);
- summed over seeds: the same on the seeds' predictions together, resampling test items (each resampled item
  brings its predictions of every seed).
Extra methods found in an evaluation (full, uls+lora, plain-lora, oracle, first-snapped) are listed beside, with
each method's latency per request where the evaluation timed prompts (`benchmarks/fair_rival_latency.sh`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from firstskip.artifacts import write_json
from firstskip.data import load_examples
from firstskip.evaluate.report import interpolate
from firstskip.metrics import primary_metric, score_items

TASKS = ("samsum", "xsum", "boolq")
BUDGETS = ("17", "30")
RIVAL = "shortgpt+lora"
RESAMPLES = 1000


def _examples(data_root: Path, name: str, limit: int = 100) -> list:
    return load_examples(str(data_root / name), "test", limit)


def _per_item(folder: Path, ds_name: str, method: str, examples: list, task: str) -> np.ndarray:
    records = {}
    for line in (folder / "predictions" / ds_name / f"{method}.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[r["id"]] = r
    preds = [records[e.id]["prediction"] for e in examples]
    choices = [e.choices for e in examples]
    choices = None if all(c is None for c in choices) else choices
    return np.asarray(score_items(task, preds, [e.references for e in examples], choices)[primary_metric(task)])


def _interval(stat, sizes: dict[str, int], seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of stat(indices per task), items resampled within each task."""
    rng = np.random.default_rng(seed)
    values = [stat({t: rng.integers(0, n, n) for t, n in sizes.items()}) for _ in range(RESAMPLES)]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return float(low), float(high)


def _kept(scores: dict[str, dict[str, np.ndarray]], method: str, idx: dict[str, np.ndarray]) -> float:
    """Mixed workload: items-weighted mean over tasks of the method's mean score over LoRA-only's."""
    total = sum(len(i) for i in idx.values())
    # scores[task][method] is (seeds, items); an index resamples items, every seed alike
    return sum(len(i) * scores[t][method][:, i].mean() / scores[t]["lora-only"][:, i].mean()
               for t, i in idx.items()) / total


def compare(evals: list[tuple[Path, dict]], data_root: Path) -> dict:
    """FiRST against the rival over one or several evaluations (seeds) of the same budget."""
    out: dict = {"tasks": {}, "mixed": {}}
    scores: dict[str, dict[str, np.ndarray]] = {}
    steps = {m: [0.0, 0.0] for m in ("first", RIVAL, "lora-only")}
    for t in TASKS:
        examples = _examples(data_root, t)
        task = evals[0][1]["datasets"][t]["task"]
        scores[t] = {m: np.stack([_per_item(f, t, _method(r, t, m), examples, task) for f, r in evals])
                     for m in ("first", RIVAL, "lora-only")}
        rs = [r["datasets"][t]["methods"] for _, r in evals]
        row: dict = {"metric": primary_metric(task), "items": len(examples)}
        for m in ("lora-only", "first", RIVAL):
            per = [x[_method(r, t, m)] for r, x in zip((r for _, r in evals), rs)]
            saved = sum(p["skip"]["saved_layer_steps"] for p in per)
            dsteps = sum(p["skip"]["decode_steps"] for p in per)
            n_layers = evals[0][1]["num_layers"]
            steps[m][0] += saved
            steps[m][1] += n_layers * dsteps
            row[m] = {"score": float(scores[t][m].mean()), "decode_saving": saved / (n_layers * dsteps) if dsteps else 0,
                      "skip_ratio": float(np.mean([p["skip"]["skip_ratio"] for p in per])),
                      "at_token_limit": sum(p["finish"]["length"] for p in per)}
        n = len(examples)
        diff = lambda idx, t=t: scores[t]["first"][:, idx[t]].mean() - scores[t][RIVAL][:, idx[t]].mean()
        row["first_minus_rival"] = {"diff": float(row["first"]["score"] - row[RIVAL]["score"]),
                                    **dict(zip(("low", "high"), _interval(diff, {t: n})))}
        out["tasks"][t] = row
    sizes = {t: scores[t]["first"].shape[1] for t in TASKS}
    full = {t: np.arange(n) for t, n in sizes.items()}
    for m in ("first", RIVAL):
        out["mixed"][m] = {"kept": _kept(scores, m, full), "decode_saving": steps[m][0] / steps[m][1]}
    d = lambda idx: _kept(scores, "first", idx) - _kept(scores, RIVAL, idx)
    out["mixed"]["first_minus_rival"] = {"diff": d(full), **dict(zip(("low", "high"), _interval(d, sizes)))}
    out["_scores"] = scores  # per-item scores for the interpolation's intervals; not written out
    return out


def _method(results: dict, task: str, family: str) -> str:
    return next(m for m in results["datasets"][task]["methods"] if m == family or m.startswith(family + ":"))


def interpolated(by_budget: dict[str, dict]) -> dict:
    """Per task and mixed, for each budget: FiRST's quality between its two calibrations at the rival's measured
    saving (linear in saving, None outside FiRST's range), and FiRST minus the rival there with a paired 95%
    interval (the interpolation weights held at the full sample's savings, the items resampled)."""
    res: dict = {}
    for t in (*TASKS, "mixed"):
        def point(c, m):
            x = c["mixed"][m] if t == "mixed" else c["tasks"][t][m]
            return (x["decode_saving"], x["kept"] if t == "mixed" else x["score"])
        first = sorted((point(c, "first") + (nn,)) for nn, c in by_budget.items())
        res[t] = {}
        for nn, c in by_budget.items():
            xr, yr = point(c, RIVAL)
            row = {"rival_saving": xr, "rival": yr, "first_interpolated": interpolate([f[:2] for f in first], xr)}
            (xa, _, a), (xb, _, b) = first[0], first[-1]
            if row["first_interpolated"] is not None and xb > xa:
                w = (xr - xa) / (xb - xa)
                sa, sb, sr = by_budget[a]["_scores"], by_budget[b]["_scores"], c["_scores"]
                if t == "mixed":
                    def d(idx):
                        return ((1 - w) * _kept(sa, "first", idx) + w * _kept(sb, "first", idx)
                                - _kept(sr, RIVAL, idx))
                    sizes = {u: sa[u]["first"].shape[1] for u in TASKS}
                else:
                    def d(idx, t=t):
                        i = idx[t]
                        return ((1 - w) * sa[t]["first"][:, i].mean() + w * sb[t]["first"][:, i].mean()
                                - sr[t][RIVAL][:, i].mean())
                    sizes = {t: sa[t]["first"].shape[1]}
                full = {u: np.arange(n) for u, n in sizes.items()}
                row["first_minus_rival"] = {"diff": float(d(full)), **dict(zip(("low", "high"), _interval(d, sizes)))}
            res[t][nn] = row
    return res


def extras(folder: Path, data_root: Path) -> dict:
    """Every method of an evaluation: score and decode saving per task, FiRST minus the method with a paired
    95% interval, mixed kept over LoRA-only and saving."""
    from firstskip.evaluate.report import mixed
    r = json.loads((folder / "results.json").read_text())
    mix = mixed(r)
    per_item = {}
    for t, ds in r["datasets"].items():
        examples = _examples(data_root, t, r["settings"]["limit"])
        per_item[t] = {m: _per_item(folder, t, m, examples, ds["task"]) for m in ds["methods"]}
    res = {}
    for m in mix["methods"]:
        res[m] = {}
        for t, ds in r["datasets"].items():
            a, b = per_item[t]["first"], per_item[t][m]
            low, high = _interval(lambda idx, t=t: a[idx[t]].mean() - b[idx[t]].mean(), {t: len(a)})
            res[m][t] = {"score": ds["methods"][m]["metrics"][ds["primary_metric"]]["score"],
                         "decode_saving": ds["methods"][m]["skip"]["decode_saving"],
                         "vs_lora_only": ds["methods"][m].get("vs", {}).get("lora-only"),
                         "first_minus": {"diff": float(a.mean() - b.mean()), "low": low, "high": high},
                         **{k: ds["methods"][m]["speed"].get(k) for k in ("latency_s", "decode_tok_s", "ttft_s")}}
        res[m]["mixed"] = {"kept": mix["methods"][m]["quality"], "decode_saving": mix["methods"][m]["decode_saving"],
                           "latency_s": mix["methods"][m]["latency_s"]}
        res[m]["layers"] = next(iter(r["datasets"].values()))["methods"][m]["skip"]["layers"]
    return res


def _diff(d: dict | None) -> str:
    return "" if d is None else f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _fmt(c: dict, label: str) -> list[str]:
    lines = []
    for t, row in c["tasks"].items():
        d = row["first_minus_rival"]
        lines.append(f"| {label} | {t} {row['metric']} | {row['lora-only']['score']:.1f} | "
                     f"{row['first']['score']:.1f} ({row['first']['decode_saving']:.3f}) | "
                     f"{row[RIVAL]['score']:.1f} ({row[RIVAL]['decode_saving']:.3f}) | "
                     f"{d['diff']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] |")
    m = c["mixed"]
    d = m["first_minus_rival"]
    lines.append(f"| {label} | mixed, kept over LoRA-only | 1.00 | {m['first']['kept']:.3f} "
                 f"({m['first']['decode_saving']:.3f}) | {m[RIVAL]['kept']:.3f} ({m[RIVAL]['decode_saving']:.3f}) | "
                 f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |")
    return lines


def print_extras(folder: Path, data_root: Path) -> dict:
    """Print `extras` of one evaluation as tables (and latencies where it timed prompts); returns it."""
    ex = extras(folder, data_root)
    tasks = [t for t in next(iter(ex.values())) if t not in ("mixed", "layers")]
    print(f"\nAll methods of {folder}: score (decode saving) [FiRST minus it, paired 95%] per task; "
          "mixed kept (saving)")
    print("| method | " + " | ".join(tasks) + " | mixed | layers |")
    print("|---|" + "---|" * (len(tasks) + 2))
    for m, x in ex.items():
        print(f"| {m} | " + " | ".join(f"{x[t]['score']:.1f} ({x[t]['decode_saving']:.3f}) "
                                       f"[{_diff(x[t]['first_minus'])}]" for t in tasks)
              + f" | {x['mixed']['kept']:.3f} ({x['mixed']['decode_saving']:.3f}) | {x['layers']} |")
    if all(x["mixed"]["latency_s"] is not None for x in ex.values()):
        print("\nLatency per request, s (decode tokens/s at batch 1), from the evaluation's timed prompts")
        print("| method | " + " | ".join(tasks) + " | mixed |")
        print("|---|" + "---|" * (len(tasks) + 1))
        for m, x in ex.items():
            print(f"| {m} | " + " | ".join(f"{x[t]['latency_s']:.2f} ({x[t]['decode_tok_s']:.1f})"
                                           for t in tasks) + f" | {x['mixed']['latency_s']:.2f} |")
    return ex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evals", type=Path, default=Path("out/eval"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--prefix", default="fair", help="evaluations PREFIX-sK-wNN (fair-tw: method change 1)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--extras", type=Path, nargs="+",
                        help="instead: every method of these evaluations against FiRST (e.g. the Qwen ones)")
    args = parser.parse_args()
    if args.extras:
        found = {str(f): print_extras(f, args.data) for f in args.extras}
        if args.out:
            write_json(args.out, found)
        return
    result: dict = {"per_seed": {}, "summed": {}, "interpolated": {}, "extras": {}}
    loaded: dict[str, dict[str, tuple[Path, dict]]] = {}
    for k in args.seeds:
        for nn in BUDGETS:
            f = args.evals / f"{args.prefix}-s{k}-w{nn}"
            if (f / "results.json").is_file():
                r = json.loads((f / "results.json").read_text())
                if len(r["datasets"]) == len(TASKS) and all(
                        any(m.startswith(RIVAL) for m in ds["methods"]) and "first" in ds["methods"]
                        for ds in r["datasets"].values()):
                    loaded.setdefault(k, {})[nn] = (f, r)
    print("| seed, budget | task | LoRA-only | FiRST (saving) | ShortGPT + LoRA (saving) | FiRST - rival [paired 95%] |")
    print("|---|---|---|---|---|---|")
    for k, by in loaded.items():
        result["per_seed"][k] = {nn: compare([fr], args.data) for nn, fr in by.items()}
        for nn, c in result["per_seed"][k].items():
            print("\n".join(_fmt(c, f"s{k}, {nn}%")))
        if len(by) == len(BUDGETS):
            result["interpolated"][k] = interpolated(result["per_seed"][k])
    for nn in BUDGETS:
        seeds = [k for k in loaded if nn in loaded[k]]
        if len(seeds) > 1:
            result["summed"][nn] = {"seeds": seeds, **compare([loaded[k][nn] for k in seeds], args.data)}
            print("\n".join(_fmt(result["summed"][nn], f"seeds {','.join(seeds)}, {nn}%")))
    if len(result["summed"]) == len(BUDGETS):
        result["interpolated"]["summed"] = interpolated(result["summed"])
    print("\nFiRST interpolated between its two calibrations at the rival's measured saving (None: outside FiRST's range)")
    print("| seed | task | budget | rival saving | rival | FiRST interpolated | FiRST - rival [paired 95%] |")
    print("|---|---|---|---|---|---|---|")
    for k, tab in result["interpolated"].items():
        for t, per in tab.items():
            for nn, x in per.items():
                fi = x["first_interpolated"]
                print(f"| {k} | {t} | {nn}% | {x['rival_saving']:.3f} | {x['rival']:.3f} | "
                      f"{'None' if fi is None else f'{fi:.3f}'} | {_diff(x.get('first_minus_rival'))} |")
    for k, by in loaded.items():
        for nn, (f, r) in by.items():
            if any(m not in ("first", "lora-only") and not m.startswith(RIVAL) for m in r["datasets"]["samsum"]["methods"]):
                result["extras"][f"s{k}-w{nn}"] = print_extras(f, args.data)
    for by in [*result["per_seed"].values(), *result["summed"].values()]:
        for c in (by.values() if "tasks" not in by else [by]):
            c.pop("_scores", None)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
