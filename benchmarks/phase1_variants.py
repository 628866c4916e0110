"""Phase 1 on smollm2-135m with the recipe's data but other regularisers: what makes the *hard*
decision (threshold 0.5) follow a skip target. The default variant is `firstskip train`'s phase 1
as it was then (today's recipe differs: docs/training.md).

Reproduce (docs/experiments/2026-11-24-issue3-recipe.md, "Meeting the target"):
    python benchmarks/phase1_variants.py v1-soft runs/p1-soft      # no polarisation, soft gates only
    python benchmarks/phase1_variants.py default runs/p1-default

A fourth variant, soft gates with each row's mean loss (per-example), ran at commit 04fc831; that
loss is no longer in the code.

Each run ends with the calibration `firstskip train` makes (threshold chosen on the held-out examples).
"""

import sys

import torch

from firstskip.data import encode_example
from firstskip.modeling import FirstSkipModel
from firstskip.train import RouterTraining, calibrate, train_routers
from firstskip.train.recipe import DEFAULT_HOLDOUT, DEFAULT_MAX_LENGTH, split_examples

# Runs of docs/experiments/2026-11-24-issue3-recipe.md. "v1-*" ran with 80 steps and max length 320 before the
# defaults settled (steps 60, length 256); the others ran with the defaults of the time (OLD) but for what they name.
OLD = {"steps": 60, "prefixes": 0.0, "distill": 0.0, "secant": 0}  # the defaults when these runs were measured
V1 = {**OLD, "steps": 80, "max_length": 320}
VARIANTS = {
    "v1-st05": {**V1, "hard_threshold": 0.5},
    "v1-soft": {**V1, "polarize": 0.0, "hard_from": None},
    "default": OLD,  # phase 1 of runs/smollm2-mix
}
DATA = ["../shared/data/samsum", "../shared/data/xsum", "../shared/data/boolq"]

variant, out = sys.argv[1], sys.argv[2]
options = dict(VARIANTS[variant])
max_length = options.pop("max_length", DEFAULT_MAX_LENGTH)
torch.set_num_threads(1)
torch.manual_seed(0)
fsm = FirstSkipModel.from_base("smollm2-135m", router_pooling="mean-all")  # the pooling these runs measured
held, train = split_examples(DATA, 0, DEFAULT_HOLDOUT, None)
encoded = [encode_example(fsm.tokenizer, ex, max_length) for ex in train]
train_routers(fsm, encoded, out, RouterTraining(skip_target=0.25, **options))
print(calibrate(out, held, 0.25, model=fsm))  # whole prompts, as `firstskip train` calibrates
