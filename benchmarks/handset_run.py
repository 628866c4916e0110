"""A FiRST run with routers set by hand (not trained) and a small random LoRA, for exercising `firstskip eval`
before a trained run exists. Its quality numbers mean nothing; its speed numbers show the mechanics.

Reproduce: python benchmarks/handset_run.py runs/handset-smollm2
Then:      firstskip eval -r runs/handset-smollm2 -d ../shared/data/samsum --limit 8 --batch-size 1 \
               --methods full,first,shortgpt,last --threads 1 --out out/eval/handset-samsum-b1
"""

import sys

import torch
from peft import LoraConfig, get_peft_model

from firstskip.modeling import FirstSkipModel

out = sys.argv[1]
torch.manual_seed(0)  # the routers' first layers are initialised from the global generator
fsm = FirstSkipModel.from_base("smollm2-135m", router_pooling="mean-all")  # as when its numbers were measured
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    # Layers 8-24 get input-dependent keep-probabilities around 0.5, so skip sets vary per prompt.
    for layer, router in enumerate(fsm.routers.routers):
        if 8 <= layer <= 24:
            router.down.weight.copy_(torch.randn(router.down.weight.shape, generator=gen) * 0.6)
            router.down.bias.fill_(0.2 if layer % 2 else -0.2)
    lora = get_peft_model(fsm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.002)
lora.save_pretrained(f"{out}/adapter")
fsm.config = fsm.config.replace(lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
fsm.save_pretrained(out)  # config.json last: the folder is a run only once everything is in place
