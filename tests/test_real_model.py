"""The invariants on the packaged real model, SmolLM2-135M-Instruct, through the text API."""

from __future__ import annotations

import torch

from firstskip.engine import Sampling
from firstskip.modeling import FirstSkipModel
from test_engine import N_NEW, hf_greedy, reference_skip

SKIP = list(range(10, 18))
PROMPTS = ["Summarize: The cat sat on the mat all day because the sun was warm.", "What is 2 + 2?"]


def test_smollm2_invariants(smollm2):
    model, tokenizer = smollm2
    fsm = FirstSkipModel.wrap(model, tokenizer, base_model="smollm2-135m")
    ids = fsm.encode(PROMPTS[0])
    greedy = Sampling(max_new_tokens=N_NEW)
    try:
        # 1. untrained routers keep every layer: plain transformers generate
        assert fsm.engine.generate([ids], greedy)[0].token_ids == hf_greedy(model, ids)
        # 3. prefill full with a forced skip set: all layers for the prompt, kept ones after
        assert fsm.engine.generate([ids], greedy, skip=[SKIP])[0].token_ids == reference_skip(model, ids, SKIP)
        # 4. a batch row (left padded) decodes what it decodes alone
        batch = fsm.generate(PROMPTS, greedy, skip=SKIP)
        alone = [fsm.generate(p, greedy, skip=SKIP)[0] for p in PROMPTS]
        assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
        assert all(g.skipped_layers == SKIP for g in batch)
    finally:
        fsm.engine.controller.detach()


def test_smollm2_text_api(smollm2):
    model, tokenizer = smollm2
    fsm = FirstSkipModel.wrap(model, tokenizer)
    try:
        gen = fsm.generate("What is the capital of France?", Sampling(max_new_tokens=16))[0]
        assert "Paris" in gen.text and gen.skipped_layers == [] and gen.finish_reason == "eos"
        stopped = fsm.generate("Count from 1 to 20.", Sampling(max_new_tokens=40), stop=["5"])[0]
        assert stopped.finish_reason == "stop" and "5" not in stopped.text
        streamed = fsm.stream("What is the capital of France?", Sampling(max_new_tokens=16))
        assert list(streamed) == gen.token_ids
    finally:
        fsm.engine.controller.detach()
    assert torch.is_grad_enabled()
