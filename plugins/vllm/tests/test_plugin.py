"""The plugin inside a real vLLM engine, on tiny random fp32 models written by ``firstskip export``.

- Routers' skip sets and greedy tokens equal ``firstskip generate`` (every family), in one batch of 8
  prompts that is chunked (32 tokens a step), mixes prefill with decode rows and, on Llama, is
  preempted for lack of KV blocks: none of that changes an answer.
- A forced set with ``routed`` prefill equals vLLM serving the pruned export of that set; keep-all
  (threshold 0) equals vLLM serving the plain base model; two concurrent requests with different
  sets each equal their solo output, also when one of them is moved to another batch slot; a
  skipped layer is really not called.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import COMMON, REFERENCE, engine, generate, greedy, on_model

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
OTHER_SET = [4, 5]


def expected(fixtures: Path, family: str) -> dict:
    return json.loads((fixtures / family / "expected.json").read_text())


def records(llm) -> dict:
    return on_model(llm, lambda model: dict(__import__("firstskip_vllm.state", fromlist=["RECORDS"]).RECORDS))


def events(llm) -> dict:
    """How many requests the plugin's slot table saw added, removed and moved so far."""
    return on_model(llm, lambda model: dict(__import__("firstskip_vllm.state", fromlist=["EVENTS"]).EVENTS))


def layer_runs(llm) -> list[int]:
    return on_model(llm, lambda model: list(model.firstskip.layer_runs))


def solo_runs(llm, prompt: list[int], params) -> tuple[list[int], list[int]]:
    """Greedy tokens of one request alone, and how often each layer was called meanwhile."""
    before = layer_runs(llm)
    tokens = generate(llm, [prompt], params)[0]
    return tokens, [a - b for a, b in zip(layer_runs(llm), before)]


def routed_answers(llm, exp: dict) -> dict:
    """Everything asked of a plugin engine: the routers' batch, and a forced set with full prefill."""
    rows, n_new = exp["rows"], exp["n_new"]
    batch = generate(llm, [r["prompt"] for r in rows], [greedy(n_new, record=f"row{i}") for i in range(len(rows))])
    forced = generate(llm, [rows[0]["prompt"]], greedy(n_new, skip=exp["skip"]))[0]
    return {"batch": batch, "records": records(llm), "forced_full": forced}


@pytest.fixture(scope="module")
def llama(fixtures: Path) -> dict:
    """Three Llama engines: the plugin (5 KV blocks of 32 tokens: the batch gets preempted), the
    pruned export of the forced set, and the plain base."""
    exp = expected(fixtures, "llama")
    rows, n_new, skip = exp["rows"], exp["n_new"], exp["skip"]
    prompts = [rows[0]["prompt"], rows[3]["prompt"]]
    out: dict = {}
    with engine(fixtures / "llama" / "vllm", num_gpu_blocks_override=5, disable_log_stats=False, **COMMON) as llm:
        out.update(routed_answers(llm, exp))
        metrics = {m.name: m for m in llm.get_metrics()}
        out["preemptions"] = metrics["vllm:num_preemptions"].value
        config = llm.llm_engine.vllm_config
        out["eager"], out["prefix_caching"] = config.model_config.enforce_eager, config.cache_config.enable_prefix_caching
        out["routed"] = [generate(llm, [p], greedy(n_new, skip=skip, prefill="routed"))[0] for p in prompts]
        out["routed_runs"] = solo_runs(llm, prompts[0], greedy(n_new, skip=skip, prefill="routed"))
        out["full_runs"] = solo_runs(llm, prompts[0], greedy(n_new, skip=skip))
        out["keep_all"] = generate(llm, prompts, greedy(n_new, threshold=0.0))
        out["solo_other"] = generate(llm, [prompts[1]], greedy(n_new, skip=OTHER_SET))[0]
        out["pair"] = generate(llm, prompts, [greedy(n_new, skip=skip), greedy(n_new, skip=OTHER_SET)])
        # a short request ahead of them finishes first: vLLM moves the last request into its slot
        moves = events(llm)["moved"]
        out["moved"] = generate(llm, [rows[1]["prompt"], *prompts],
                                [greedy(2), greedy(n_new, skip=skip), greedy(n_new, skip=OTHER_SET)])[1:]
        out["moves"] = events(llm)["moved"] - moves
    with engine(fixtures / "llama" / "pruned", **REFERENCE) as llm:
        out["pruned"] = [generate(llm, [p], greedy(n_new))[0] for p in prompts]
    with engine(fixtures / "llama" / "base", **REFERENCE) as llm:
        out["plain"] = generate(llm, prompts, greedy(n_new))
    return out


def check_against_firstskip(answers: dict, exp: dict) -> None:
    """Skip sets where no keep-probability is within 1e-3 of the threshold, and then tokens, equal."""
    for i, row in enumerate(exp["rows"]):
        got = answers["records"][f"row{i}"]
        assert got["keep_probs"] == pytest.approx(row["keep_probs"], abs=1e-4), f"row {i}"
        if min(abs(p - 0.5) for p in row["keep_probs"]) > 1e-3:
            assert got["skip"] == row["skip"], f"row {i}"
            assert answers["batch"][i] == row["tokens"], f"row {i}"
    assert answers["forced_full"] == exp["rows"][0]["forced_tokens"]


def test_llama_equals_firstskip_through_chunks_and_preemption(llama, fixtures):
    assert llama["preemptions"] > 0, "the batch was meant to be preempted"
    check_against_firstskip(llama, expected(fixtures, "llama"))


def test_the_engine_settings_are_applied(llama):
    assert llama["eager"] is True and llama["prefix_caching"] is False


def test_a_forced_set_with_routed_prefill_equals_the_pruned_export(llama):
    assert llama["routed"] == llama["pruned"]


def test_keep_all_equals_the_plain_model(llama):
    assert llama["keep_all"] == llama["plain"]


def test_two_requests_with_different_sets_each_equal_their_solo_output(llama):
    assert llama["pair"] == [llama["forced_full"], llama["solo_other"]]


def test_a_request_moved_to_another_slot_keeps_its_set(llama):
    assert llama["moves"] > 0, "a request was meant to change slots"
    assert llama["moved"] == [llama["forced_full"], llama["solo_other"]]


def test_a_skipped_layer_is_not_called(llama, fixtures):
    n_new, skip = expected(fixtures, "llama")["n_new"], expected(fixtures, "llama")["skip"]
    num_layers = len(llama["routed_runs"][1])
    kept = [i for i in range(num_layers) if i not in skip]
    # routed prefill: the set's layers never run; full prefill: once, for the prompt (one 32-token step)
    assert [llama["routed_runs"][1][i] for i in skip] == [0, 0]
    assert [llama["full_runs"][1][i] for i in skip] == [1, 1]
    assert all(llama["full_runs"][1][i] == n_new for i in kept)  # one prefill step + n_new - 1 decode steps


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_other_families_equal_firstskip(family, fixtures):
    exp = expected(fixtures, family)
    with engine(fixtures / family / "vllm", **COMMON) as llm:
        answers = routed_answers(llm, exp)
    check_against_firstskip(answers, exp)
