"""Print the ratios, bound and faults of `firstskip bench --json` result files (the benchmark scripts' summary)."""

import json
import sys

for path in sys.argv[1:]:
    with open(path) as f:
        result = json.load(f)
    print(path, {k: v for k, v in result.items() if "_over_" in k or k in ("bound", "faults")})
