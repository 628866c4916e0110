"""Training FiRST: routers on a frozen base (phase 1), LoRA under the learned skips (phase 2), calibration.

Modules, upstream first: `loop` (data order, processes, checkpoints, log), `passes` (the gated and
prompt-scoring forward passes), `phases` (the two objectives and their entry points), `calibrate`
(the threshold from held-out data) and `recipe` (all of it from names, as `firstskip train` runs it).
Everything here works on token ids; only `recipe` and `calibrate` encode text.
"""

from firstskip.train.calibrate import Calibration, calibrate
from firstskip.train.loop import Encoded, LoopSettings
from firstskip.train.phases import LoraTraining, RouterTraining, train_lora, train_routers
from firstskip.train.recipe import held_out_examples, train

__all__ = ["Calibration", "Encoded", "LoopSettings", "LoraTraining", "RouterTraining", "calibrate", "held_out_examples", "train",
           "train_lora", "train_routers"]
