"""Pareto curves over several evaluations: quality against measured token-weighted decode saving.

Each ``firstskip eval`` folder holds one operating point per method; evaluations of the same run at
other thresholds (or calibrations), and rival runs trained at other budgets, add points. This joins
them into one curve per method family, per dataset and on the mixed workload, and writes the curves
(PNG) and each family's quality at every measured saving, interpolated where points do not line up
(JSON)::

    python -m firstskip.evaluate.pareto out/eval/t40 out/eval/t50 out/eval/t60 --out out/pareto.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firstskip import artifacts
from firstskip.errors import FirstSkipError
from firstskip.evaluate.report import RESULTS_JSON, equal_saving_table, pareto_points, plot_pareto


def write_curves(folders: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Draw the evaluations in ``folders`` together at ``out`` (.png) and write the equal-saving table
    beside it (same name, .json); returns the table."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise FirstSkipError(f"--out must name a .png file, got {out}")
    evaluations = []
    for folder in folders:
        path = Path(folder) / RESULTS_JSON
        if not path.is_file():
            raise FirstSkipError(f"{folder} holds no {RESULTS_JSON} (an output folder of firstskip eval)")
        results = json.loads(path.read_text(encoding="utf-8"))
        if any("decode_saving" not in r["skip"] for ds in results["datasets"].values() for r in ds["methods"].values()):
            raise FirstSkipError(f"{path} has no decode savings (written by an older firstskip): run eval again")
        evaluations.append(results)
    if not evaluations:
        raise FirstSkipError("give at least one evaluation folder")
    panels = pareto_points(evaluations)
    plot_pareto(panels, out)
    table = {"evaluations": [str(f) for f in folders], "panels": equal_saving_table(panels)}
    artifacts.write_json(out.with_suffix(".json"), table)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m firstskip.evaluate.pareto", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="firstskip eval output folders")
    parser.add_argument("--out", required=True, help="the plot to write (.png); the table goes beside it (.json)")
    args = parser.parse_args(argv)
    try:
        write_curves(args.folders, args.out)
    except FirstSkipError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")


if __name__ == "__main__":
    main()
