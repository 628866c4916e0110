#!/usr/bin/env bash
# A copy of a trained run, recalibrated for another skip target on the same held-out training prompts.
# Usage: bash benchmarks/recalibrated_copy.sh RUN TARGET DATA [DATA ...]   (writes RUN-tTARGET)
set -euo pipefail
RUN=$1; T=$2; shift 2
R="$RUN-t$T"
if [ ! -d "$R" ]; then
  rm -rf "$R.tmp"  # left by an interrupted copy; cp would nest the run inside it
  cp -r "$RUN" "$R.tmp" && rm -rf "$R.tmp/checkpoint" && mv "$R.tmp" "$R"
fi
DATA=(); for d in "$@"; do DATA+=(--data "$d"); done
firstskip calibrate --run "$R" "${DATA[@]}" --skip-target "$T"
