"""Write the plugin tests' models with firstskip itself (run with firstskip's Python, not vLLM's).

For each family: a small random base (head size 32, the least vLLM's CPU attention takes), a FiRST
run on it with random routers (so prompts choose different skip sets), its ``--format vllm`` export,
the ``--format pruned`` export of `SKIP`, and what ``firstskip generate`` answers for a few prompts
(skip sets, keep-probabilities, greedy tokens), so the plugin is checked against firstskip's own
engine. Also a run on the packaged SmolLM2 (``smollm2/runs/mine``, as README names it) with its
answers to 20 chat prompts, and firstskip's decisions on random keep-probabilities (``decisions.json``).
Usage: ``python make_fixtures.py OUT_DIR [FAMILY ...]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from firstskip.config import FirstSkipConfig
from firstskip.engine import Sampling
from firstskip.export import export, vllm_settings
from firstskip.modeling import FirstSkipModel
from firstskip.routers import decide

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SKIP = [2, 3]  # a quarter of the 8 layers
N_NEW = 8
CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=256, max_position_embeddings=512,
              initializer_range=0.05, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def prompts() -> list[list[int]]:
    """Token-id prompts of several lengths (no tokenizer: the base models are random)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (5, 9, 17, 31, 48, 64, 12, 23)]


def base_model(family: str, folder: Path) -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **CONFIG)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)


def run_with_random_routers(base: Path, folder: Path) -> FirstSkipModel:
    """Routers whose keep-probability depends on the prompt, centred on the threshold (0.5)."""
    fsm = FirstSkipModel.from_base(str(base))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for router in fsm.routers.routers:
            router.down.weight.normal_(0.0, 1.0, generator=gen)
            router.down.bias.zero_()
    fsm.save_pretrained(folder)
    return fsm


def expected(fsm: FirstSkipModel) -> list[dict]:
    """firstskip's own answers: full prefill, the run's threshold, greedy decoding."""
    rows = []
    for ids in prompts():
        gen = fsm.engine.generate([ids], Sampling(max_new_tokens=N_NEW))[0]
        forced = fsm.engine.generate([ids], Sampling(max_new_tokens=N_NEW), skip=[SKIP])[0]
        rows.append({"prompt": ids, "skip": gen.skipped_layers, "keep_probs": gen.keep_probs,
                     "tokens": gen.token_ids, "forced_tokens": forced.token_ids})
    return rows


def decisions() -> list[dict]:
    """firstskip's decisions on random keep-probabilities under each kind of decision, with the
    settings an export would carry: the plugin's own ``decide`` must agree."""
    gen = torch.Generator().manual_seed(3)
    configs = [FirstSkipConfig(num_layers=10, hidden_size=8), FirstSkipConfig(num_layers=10, hidden_size=8, threshold=0.3,
                                                                             protected_layers=[0, 1, 9]),
               FirstSkipConfig(num_layers=10, hidden_size=8, decision="budget", skip_ratio=0.3),
               FirstSkipConfig(num_layers=10, hidden_size=8, decision="snapped", snap_sets=[[2, 3], [5], [4, 6, 7]]),
               FirstSkipConfig(num_layers=10, hidden_size=8, static_skip=[1, 8])]
    cases = []
    for config in configs:
        probs = torch.rand(16, 10, generator=gen)
        skip = decide(probs, config)
        cases.append({"settings": vllm_settings(config), "probs": probs.tolist(),
                      "skip": [row.nonzero().squeeze(-1).tolist() for row in skip]})
    return cases


QUESTIONS = ["Is the Pacific the largest ocean?", "Name three rivers.", "What is 12 times 7?", "Why is the sky blue?",
             "Translate 'good morning' into French.", "Write a haiku about rain.", "Is water wet? Answer yes or no.",
             "Who wrote Hamlet?", "What is the capital of Japan?", "Give a synonym for happy.",
             "Summarize: The cat sat on the mat all day and refused to move.", "List two prime numbers.",
             "What colour is grass?", "How many legs does a spider have?", "What is the boiling point of water?",
             "Name a fruit that is yellow.", "Is 17 a prime number?", "What does CPU stand for?",
             "Spell 'necessary' backwards.", "What is the opposite of cold?"]


def smollm2(root: Path, n_new: int = 16) -> None:
    """A run on the packaged model whose routers skip some layers, and firstskip's answers to QUESTIONS."""
    fsm = FirstSkipModel.from_base("smollm2-135m")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for router in fsm.routers.routers:
            router.down.weight.normal_(0.0, 1.0, generator=gen)
            router.down.bias.normal_(2.0, 1.5, generator=gen)
    fsm.save_pretrained(root / "runs" / "mine")
    rows = []
    for question in QUESTIONS:
        ids = fsm.encode(question)
        out = fsm.engine.generate([ids], Sampling(max_new_tokens=n_new))[0]
        rows.append({"prompt": ids, "skip": out.skipped_layers, "keep_probs": out.keep_probs, "tokens": out.token_ids})
    (root / "expected.json").write_text(json.dumps({"threshold": fsm.config.threshold, "n_new": n_new, "rows": rows}))
    export(root / "vllm", "vllm", run=root / "runs" / "mine")


def main(out: Path, families: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decisions.json").write_text(json.dumps(decisions()))
    if "smollm2" in families:
        families.remove("smollm2")
        smollm2(out / "smollm2")
    for family in families:
        root = out / family
        base_model(family, root / "base")
        fsm = run_with_random_routers(root / "base", root / "run")
        export(root / "vllm", "vllm", run=root / "run")
        export(root / "pruned", "pruned", run=root / "run", skip=SKIP)
        (root / "expected.json").write_text(json.dumps({"skip": SKIP, "n_new": N_NEW, "rows": expected(fsm)}))
    print(f"fixtures for {', '.join(families)} in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or [*FAMILIES, "smollm2"])
