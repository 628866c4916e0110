"""The engine's own decode loop: per-request state, a cache pool requests join and leave.

Every generation must produce exactly what it produces alone, however it is interleaved with
others on the same loaded model: streams stepped token by token, threads, requests joining and
leaving a running batch. The references are solo runs, which test_engine.py ties to transformers.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from conftest import tiny
from firstskip import families
from firstskip.config import FirstSkipConfig
from firstskip.decoding import _Group, _SlotsView, _uniform
from firstskip.engine import Engine, Sampling
from firstskip.families import decoder_layers
from firstskip.models import load_model
from firstskip.quantize import quantize
from firstskip.routers import RouterBank

FAMILIES = ["llama", "gemma3_text", "gpt2"]  # rotary, two rotary bases with sliding windows, learned positions


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, routed: bool = False, **config) -> Engine:
    cfg = FirstSkipConfig(num_layers=len(decoder_layers(model)), hidden_size=model.config.hidden_size, **config)
    routers = None
    if routed:  # input-dependent keep-probabilities, so different prompts skip different layers
        with torch.random.fork_rng():  # the same routers whichever tests ran before
            torch.manual_seed(0)
            routers = RouterBank(cfg)
            for router in routers.routers:
                torch.nn.init.normal_(router.down.weight, std=2.0)
    return Engine(model, cfg, routers)


def solo(eng: Engine, ids: list[int], n: int, skip: list[int] | None = None, **sampling) -> list[int]:
    return eng.generate([ids], Sampling(max_new_tokens=n, **sampling), None if skip is None else [skip])[0].token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_interleaved_streams_and_generations_equal_their_solo_runs(family):
    eng = engine(tiny(family), routed=True, threshold=0.5)
    a, b, c = prompt(11, 1), prompt(6, 2), prompt(9, 3)
    expected = [solo(eng, a, 10), solo(eng, b, 10, [2, 3]), solo(eng, c, 6)]
    first, second = eng.stream(a, Sampling(max_new_tokens=10)), eng.stream(b, Sampling(max_new_tokens=10), skip=[2, 3])
    got: list[list[int]] = [[], []]
    middle = None
    for step, (x, y) in enumerate(zip(first, second)):
        got[0].append(x)
        got[1].append(y)
        if step == 4:  # a whole generation runs between two tokens of each stream
            middle = solo(eng, c, 6)
    assert got == expected[:2] and middle == expected[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_threads_generating_at_once_equal_their_solo_runs(family):
    eng = engine(tiny(family), routed=True, threshold=0.5)
    jobs = [(prompt(5 + 3 * i, 10 + i), None if i % 2 else [1 + i % 4]) for i in range(6)]
    expected = [solo(eng, ids, 12, skip) for ids, skip in jobs]
    results: list[list[int] | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = solo(eng, jobs[i][0], 12, jobs[i][1])
                assert results[i] == expected[i]
        except BaseException as err:  # noqa: BLE001  (reported by the main thread)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert results == expected


def test_per_request_decisions_do_not_leak_between_prefills():
    eng = engine(tiny("qwen2"), routed=True)
    ids = prompt(9, 4)
    strict = eng.prefill([ids], config=eng.config.replace(threshold=0.9)).skip
    plain = eng.prefill([ids]).skip
    off = eng.prefill([ids], routers=False)
    assert strict.sum() > plain.sum() >= 0 and off.probs is None and not off.skip.any()
    assert eng.config.threshold == 0.5  # the engine's own default is untouched


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_requests_joining_and_leaving_a_running_batch_equal_their_solo_runs(family):
    eng = engine(tiny(family))
    jobs = {"a": (prompt(12, 5), [2, 3], 9), "b": (prompt(5, 6), [], 4), "c": (prompt(14, 7), [1, 4], 8),
            "d": (prompt(7, 8), [2, 3], 6)}
    expected = {name: solo(eng, ids, n, skip) for name, (ids, skip, n) in jobs.items()}
    batch = eng.new_batch()
    requests = {}

    def join(name: str) -> None:
        ids, skip, n = jobs[name]
        (requests[name],) = eng.join(batch, eng.prefill([ids], [skip]), Sampling(max_new_tokens=n))

    join("a")
    join("b")
    batch.step()
    batch.step()
    join("c")  # joins a batch already two steps in, with a longer prompt than any slot holds
    batch.step()
    assert requests["b"].done and requests["b"] not in batch.requests  # b ended (4 tokens) and left
    join("d")
    while batch.requests:
        batch.step()
    assert {name: r.generation.token_ids for name, r in requests.items()} == expected


def test_a_cancelled_request_frees_its_slots_and_the_others_go_on():
    eng = engine(tiny("llama"))
    jobs = [(prompt(6, 20), [2]), (prompt(9, 21), [3]), (prompt(4, 22), [2])]
    expected = [solo(eng, ids, 8, skip) for ids, skip in jobs]
    batch = eng.new_batch()
    requests = [eng.join(batch, eng.prefill([ids], [skip]), Sampling(max_new_tokens=8))[0] for ids, skip in jobs]
    batch.step()
    batch.leave(requests[0])
    assert all(requests[0] not in slots.owners for slots in batch.pool.layers)
    while batch.requests:
        batch.step()
    assert [r.generation.token_ids for r in requests[1:]] == expected[1:]


def test_the_pool_holds_only_kept_layers_sized_to_prompt_and_new_tokens():
    model = tiny("llama")
    eng = engine(model)
    pre = eng.prefill([prompt(10, 30), prompt(7, 31)], [[2, 3], [3]])
    batch = eng.new_batch(2, 10 + 5)
    eng.join(batch, pre, Sampling(max_new_tokens=5))
    owners = [len(slots.owners) for slots in batch.pool.layers]
    assert owners == [2, 2, 1, 0, 2, 2]  # layer 3 is skipped by both, layer 2 by the first
    assert batch.pool.layers[3].keys is None
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    per_slot = 2 * kv_heads * 16 * head_dim * 4  # keys and values, 15 positions and the spare one, fp32
    assert batch.pool.nbytes() == per_slot * 2 * 5  # 2 slots in each of the 5 layers someone keeps (capacity 2)


def test_a_layer_reads_its_cache_as_a_view_of_the_pool_not_a_copy():
    eng = engine(tiny("llama"))
    batch = eng.new_batch()
    eng.join(batch, eng.prefill([prompt(6, 40), prompt(8, 41)]), Sampling(max_new_tokens=4))
    slots = batch.pool.layers[1]
    group = _Group(None, torch.tensor([6, 8]), [6, 8])
    view = _SlotsView(slots, group, torch.ones(2, 1, 1, group.length, dtype=torch.bool))
    keys, values = view.update(torch.ones(2, slots.keys.shape[1], 1, slots.keys.shape[3]),
                               torch.ones(2, slots.values.shape[1], 1, slots.values.shape[3]))
    assert keys.data_ptr() == slots.keys.data_ptr() and values.data_ptr() == slots.values.data_ptr()
    assert bool((slots.keys[0, :, 6] == 1).all()) and bool((slots.keys[1, :, 8] == 1).all())


def test_compiled_layer_steps_decode_as_eager_and_a_new_skip_set_compiles_nothing():
    eng = engine(tiny("llama"))
    jobs = [(prompt(12, 90), [2, 3]), (prompt(7, 91), [1])]
    expected = [solo(eng, ids, 6, skip) for ids, skip in jobs]
    together = eng.generate([ids for ids, _ in jobs], Sampling(max_new_tokens=6), [skip for _, skip in jobs])
    assert eng.compile()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert [solo(eng, ids, 6, skip) for ids, skip in jobs] == expected
    assert eng.generate([ids for ids, _ in jobs], Sampling(max_new_tokens=6),
                        [skip for _, skip in jobs]) == together  # a batch of rows that keep different layers
    solo(eng, prompt(9, 92), 5, [0, 4])  # a skip set, prompt length and batch never seen
    batch = eng.new_batch(4)  # as the server's: the pool sized by the requests that join it
    eng.join(batch, eng.prefill([prompt(9, 93), prompt(11, 94)], [[1], [1, 2]]), Sampling(max_new_tokens=5))
    while batch.requests:  # the longest row's last step reads its slot to the end
        batch.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_the_compiled_step_checks_layers_once_only_when_they_are_all_alike():
    """Dynamo's per-call checks of the layer argument are dropped only for layers that differ in
    nothing the step could read (modules, settings, hooks, tensor shapes and dtypes)."""
    layers = decoder_layers(tiny("llama"))
    assert _uniform(layers)
    layers[3].input_layernorm.variance_epsilon *= 2
    assert not _uniform(layers)
    layers = decoder_layers(tiny("llama"))
    layers[1].mlp.register_forward_hook(lambda *_: None)
    assert not _uniform(layers)


def test_compiled_stacks_of_two_weight_formats_in_one_process_each_decode_as_eager():
    """Each stack compiles its own program: one stack's must never run another's layers."""
    for fmt in ("int8", "int4"):
        eng = engine(quantize(tiny("llama"), fmt))
        expected = solo(eng, prompt(9, 94), 6, [2])
        assert eng.compile()
        assert solo(eng, prompt(9, 94), 6, [2]) == expected


def test_compiling_stays_eager_with_a_notice_where_it_cannot(monkeypatch, capsys):
    assert not engine(tiny("gpt2")).compile()
    assert "decoding eager: only Llama-layout layers" in capsys.readouterr().err
    monkeypatch.setattr("shutil.which", lambda name: None)
    eng = engine(tiny("llama"))
    assert not eng.compile()
    assert "decoding eager: no C++ compiler found" in capsys.readouterr().err
    assert solo(eng, prompt(6, 93), 4, [2])  # still decodes


def test_decoding_never_calls_the_models_forward():
    model = tiny("qwen3")
    eng = engine(model)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    eng.generate([prompt(8, 50), prompt(5, 51)], Sampling(max_new_tokens=6), skip=[[2], [3, 4]])
    assert len(calls) == 1  # the prefill


def test_a_family_without_the_own_loop_decodes_through_the_forward(monkeypatch, capsys):
    ids, skip = prompt(9, 60), [2, 3]
    expected = solo(engine(tiny("phi3")), ids, 8, skip)
    monkeypatch.setitem(families.FAMILIES, "phi3", dataclasses.replace(families.FAMILIES["phi3"], own_decode=False))
    eng = engine(tiny("phi3"))
    assert "decoding through the model's own forward" in capsys.readouterr().err
    assert solo(eng, ids, 8, skip) == expected
    assert list(eng.stream(ids, Sampling(max_new_tokens=8), skip=skip)) == expected


def test_seeded_sampling_of_a_row_does_not_depend_on_its_batch():
    eng = engine(tiny("llama"))
    hot = Sampling(max_new_tokens=10, temperature=1.3, top_k=40, seed=7)
    a, b = prompt(6, 70), prompt(9, 71)
    together = eng.generate([a, b], hot)
    assert [g.token_ids for g in together] == [eng.generate([a], hot)[0].token_ids, eng.generate([b], hot)[0].token_ids]


@pytest.mark.parametrize("family", [name for name, row in families.FAMILIES.items() if row.layer_step == "llama"])
def test_the_llama_layer_step_computes_what_the_layers_own_forward_does(family):
    eng = engine(tiny(family))
    pre = eng.prefill([prompt(11, 80), prompt(6, 81)], [[2], [3, 4]])
    logits = []
    for layers in (eng.stack.layers, eng.controller.inner):
        batch, eng.stack.layers = eng.new_batch(), layers
        eng.join(batch, pre, Sampling(max_new_tokens=3))
        plan = [(layer, rows, [r.length for r in owners]) for layer, rows, owners in batch.plan()]
        logits.append(eng.stack(torch.tensor([r.token for r in batch.requests]),
                                torch.tensor([r.length for r in batch.requests]), batch.pool, plan))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bfloat16_decoding_equals_transformers_generate_in_bfloat16(family):
    model = load_model(f"random:tiny-{family}", dtype="bfloat16")[0]
    eng = engine(model)
    for seed in range(3):
        ids = prompt(20, 90 + seed)
        reference = model.generate(torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert solo(eng, ids, 10) == reference


def test_a_run_loads_in_bfloat16_with_its_routers_in_float32(tmp_path):
    from firstskip.modeling import FirstSkipModel

    FirstSkipModel.from_base("random:tiny-llama").save_pretrained(tmp_path / "run")
    fsm = FirstSkipModel.from_pretrained(tmp_path / "run", dtype="bfloat16")  # fingerprinted in float32
    assert next(fsm.model.parameters()).dtype == torch.bfloat16
    assert next(fsm.routers.parameters()).dtype == torch.float32
    pre = fsm.engine.prefill([prompt(9, 95)])
    assert pre.probs.dtype == torch.float32 and len(fsm.engine.decode(pre, Sampling(max_new_tokens=4))[0].token_ids) == 4


def test_routed_prefill_with_a_layer_every_row_skips_joins_the_batch():
    """Layer 0 skipped by every row in routed prefill leaves its prefill cache empty; each row's prompt
    KV is still found (prompts are left-padded to the longest)."""
    eng = engine(tiny("llama"), prefill="routed")
    jobs = [(prompt(7, 100), [0, 2]), (prompt(4, 101), [0])]
    together = eng.generate([ids for ids, _ in jobs], Sampling(max_new_tokens=5), skip=[s for _, s in jobs])
    assert [g.token_ids for g in together] == [solo(eng, ids, 5, skip) for ids, skip in jobs]
