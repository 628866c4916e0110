"""Why int4 keeps a run's LoRA beside the 4-bit weights and the head in int8: how far 4-bit rounding
moves the weights (relative Frobenius change) and the logits (KL to float32), on a merged run.

Weights: the base's layer weights (the run's merged weights minus its LoRA) rounded per group of 32
with float32 and with bfloat16 scales, the LoRA's own change, the merged weights rounded, and the
LM head (the tied embedding) rounded. Logits: mean KL(float32 || format) over a few test prompts for
int8 (LoRA merged), int4 of the merged weights (the first, removed design) and int4 with the LoRA
beside (`--dtype int4`).

Reproduce:
    python benchmarks/int4_rounding.py --run runs/sec4s0 --out benchmarks/results/int4_rounding.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from safetensors.torch import load_file

from firstskip.artifacts import write_json
from firstskip.data import encode_prompt, load_examples
from firstskip.modeling import FirstSkipModel
from firstskip.quantize import INT4_GROUP, quantize


def rounding(w: torch.Tensor, bf16_scales: bool) -> float:
    """Relative change of ``w`` rounded to 16 levels per group (min/max grid, as `Int4Linear`)."""
    groups = w.reshape(w.shape[0], -1, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
    if bf16_scales:
        scale, low = scale.bfloat16().float(), (low + 8 * scale).bfloat16().float() - 8 * scale.bfloat16().float()
    return float(((codes * scale[..., None] + low[..., None]).reshape(w.shape) - w).norm() / w.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    merged = load_file(f"{args.run}/model/model.safetensors")
    adapter = load_file(f"{args.run}/adapter/adapter_model.safetensors")
    cfg = json.load(open(f"{args.run}/config.json"))["lora"]
    scaling = cfg["alpha"] / cfg["r"]
    stats: dict[str, list[float]] = {k: [] for k in ("base_fp32_scales", "base_bf16_scales", "lora_change", "merged")}
    for name, w in merged.items():
        key = "base_model.model." + name.removesuffix(".weight")
        if key + ".lora_A.weight" not in adapter:
            continue
        delta = scaling * adapter[key + ".lora_B.weight"] @ adapter[key + ".lora_A.weight"]
        base = w - delta
        stats["base_fp32_scales"].append(rounding(base, False))
        stats["base_bf16_scales"].append(rounding(base, True))
        stats["lora_change"].append(float(delta.norm() / w.norm()))
        stats["merged"].append(rounding(w, True))
    weights = {k: round(sum(v) / len(v), 5) for k, v in stats.items()}
    weights["head"] = round(rounding(merged["model.embed_tokens.weight"], True), 5)

    reference = FirstSkipModel.from_pretrained(args.run)
    formats = {"int8": quantize(copy.deepcopy(reference.model), "int8"),
               "int4_merged": quantize(copy.deepcopy(reference.model), "int4"),
               "int4_lora_beside": FirstSkipModel.from_pretrained(args.run, dtype="int4").model}
    examples = load_examples("../shared/data/samsum", "test", args.prompts)
    kl = {name: 0.0 for name in formats}
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([encode_prompt(reference.tokenizer, ex.prompt)])
            want = reference.model(ids).logits.log_softmax(-1)
            for name, model in formats.items():
                got = model(ids).logits.float().log_softmax(-1)
                kl[name] += float((want.exp() * (want - got)).sum(-1).mean()) / len(examples)
    result = {"run": args.run, "weight_change": weights, "logits_kl": {k: round(v, 5) for k, v in kl.items()}}
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
