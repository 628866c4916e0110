"""Evaluation end to end on a tiny model that reads real text: the equal-budget rule, resuming without
recomputing, the report's files, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from firstskip import artifacts
from firstskip.baselines import BaselineContext, equal_budget_k, static_skip_set
from firstskip.data import load_examples
from firstskip.engine import Generation, Sampling
from firstskip.errors import FirstSkipError
from firstskip.evaluate import evaluate_run, inspect_run, method_names, parse_methods, runner
from firstskip.evaluate.store import PredictionStore
from firstskip.families import FAMILIES
from firstskip.modeling import FirstSkipModel, peft_quietly
from firstskip.models import cache_dir

SENTENCES = ["a gorgeous , witty , seductive movie .", "it 's slow -- very , very slow .",
             "the acting is fine but the script is about as interesting as a recording of conversations "
             "at the wal-mart checkout line .", "a masterpiece four years in the making .",
             "one long string of cliches .", "the film is strictly routine .",
             "an utterly charming and hilarious film that reminded me of the best of the disney comedies from the "
             "60s .", "it 's a cookie-cutter movie , a cut-and-paste job ."]
METHODS = "full,lora-only,first,first-nolora,random,shortgpt,uls-per-example"
NEW_TOKENS = 3


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def sentiment(split: str, n: int) -> list[dict]:
    return [{"id": f"{split}-{i}", "task": "classification", "prompt": f"Review: {s}\nPositive or negative?",
             "reference": "positive" if i % 2 == 0 else "negative", "choices": ["negative", "positive"]}
            for i, s in enumerate(SENTENCES[:n])]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "toy" / "test.jsonl", sentiment("test", 8))
    write_jsonl(root / "toy" / "train.jsonl", sentiment("train", 4))
    summaries = [{"id": f"s-{i}", "task": "summarization", "prompt": f"Summarize: {s}", "reference": s}
                 for i, s in enumerate(SENTENCES[:4])]
    write_jsonl(root / "toysum" / "test.jsonl", summaries)
    write_jsonl(root / "toysum" / "train.jsonl", summaries)
    write_jsonl(root / "noref" / "test.jsonl", [{"id": "x", "task": "classification", "prompt": "hi"}])
    return {name: root / name for name in ("toy", "toysum", "noref")}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, request) -> Path:
    """A tiny random llama with SmolLM2's tokenizer: real text in, millisecond forward passes."""
    folder = cache_dir() / "smollm2-135m"
    if not folder.is_dir():
        request.getfixturevalue("smollm2")  # converts the packaged model, once per machine
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.for_model(**{"model_type": "llama", **FAMILIES["llama"].tiny, "vocab_size": len(tokenizer),
                                     "tie_word_embeddings": True})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny-smol")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_run(base: Path, folder: Path, adapter: bool) -> Path:
    """Routers of layers 1-4 set by hand so that decisions vary from prompt to prompt."""
    with torch.random.fork_rng():
        torch.manual_seed(3)  # routers' first layers are initialised from the global generator
        fsm = FirstSkipModel.from_base(str(base), router_pooling="mean-all")  # the pooling `gen` was picked for
    gen = torch.Generator().manual_seed(1)  # with it, toy prompts get 1 or 2 skipped layers
    with torch.no_grad():
        for layer in (1, 2, 3, 4):
            router = fsm.routers.routers[layer]
            router.down.weight.copy_(torch.randn(router.down.weight.shape, generator=gen) * 4)
            router.down.bias.fill_(0.3 * (layer - 2))
    if adapter:
        with peft_quietly():
            lora = get_peft_model(fsm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_" in name:  # both factors from `gen`: peft draws lora_A from the global generator
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        lora.save_pretrained(folder / artifacts.ADAPTER_DIR)
        fsm.config = fsm.config.replace(lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    fsm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tiny_base, tmp_path_factory) -> Path:
    return make_run(tiny_base, tmp_path_factory.mktemp("run"), adapter=True)


@pytest.fixture(scope="module")
def evaluated(run, data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval")
    results = evaluate_run(run, [str(data["toy"]), str(data["toysum"])], METHODS, limit=None, out_dir=out,
                           batch_size=3, max_new_tokens=NEW_TOKENS, calibration_items=4, speed_items=3,
                           progress=False)
    return out, results


def records(out: Path, dataset: str, method: str) -> dict[str, dict]:
    return PredictionStore(out / "predictions" / dataset / f"{method}.jsonl").records


# -- the equal-budget rule ------------------------------------------------------------------

def test_static_baselines_skip_firsts_mean_count_and_per_example_its_own(evaluated, run):
    out, results = evaluated
    toy = results["datasets"]["toy"]
    decided = records(out, "toy", "decisions")
    counts = {i: len(r["skipped"]) for i, r in decided.items()}
    assert len(set(counts.values())) > 1, "the routers must vary per prompt for this test to mean anything"
    first = records(out, "toy", "first")
    assert {i: r["skipped"] for i, r in first.items()} == {i: r["skipped"] for i, r in decided.items()}
    k = equal_budget_k(list(counts.values()))
    assert toy["budget"]["k"] == k

    config = artifacts.load_config(run)
    bi = json.loads((run / runner.BLOCK_INFLUENCE_NAME).read_text())["toy"]["block_influence"]
    ctx = BaselineContext(config.num_layers, tuple(config.protected), block_influence=bi)
    for name in ("random", "shortgpt"):
        expected = static_skip_set(name, ctx, k)
        assert all(r["skipped"] == expected for r in records(out, "toy", name).values())
        skip = toy["methods"][name]["skip"]
        assert skip["k"] == k and skip["layers"] == expected and skip["mean_skipped"] == k
        assert skip["skip_ratio"] == skip["decode_saving"] == k / config.num_layers  # the same set on every token
    for item, r in records(out, "toy", "uls-per-example").items():
        assert r["skipped"] == static_skip_set("uls", ctx, counts[item])
    assert toy["methods"]["uls-per-example"]["skip"]["mean_skipped"] == pytest.approx(toy["budget"]["first_mean_skipped"])
    assert all(r["skipped"] == [] for m in ("full", "lora-only") for r in records(out, "toy", m).values())


def test_lora_changes_the_model_and_block_influence_is_cached_per_dataset(evaluated, run):
    out, _ = evaluated
    full, lora = records(out, "toy", "full"), records(out, "toy", "lora-only")
    assert any(full[i]["prediction"] != lora[i]["prediction"] for i in full)
    cache = json.loads((run / runner.BLOCK_INFLUENCE_NAME).read_text())
    assert set(cache) == {"toy", "toysum"} and cache["toy"]["calibration"]["split"] == "train"


# -- outputs --------------------------------------------------------------------------------

def test_results_json_markdown_and_plots(evaluated):
    out, results = evaluated
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results["datasets"]) == {"toy", "toysum"}
    toy = results["datasets"]["toy"]
    assert toy["primary_metric"] == "accuracy" and results["datasets"]["toysum"]["primary_metric"] == "rougeL"
    assert list(toy["methods"]) == METHODS.split(",")
    for result in toy["methods"].values():
        score = result["metrics"]["accuracy"]
        assert score["low"] <= score["score"] <= score["high"]
        assert result["speed"]["prompts"] == 3 and result["speed"]["ttft_s"] > 0
        assert result["speed"]["decode_tok_s"] > 0 and result["batched"]["decode_tok_s"] > 0
        assert sum(result["finish"].values()) == toy["items"] == 8
        assert result["speed"]["latency_s"] > result["speed"]["ttft_s"] or result["skip"]["decode_steps"] == 0
        assert result["batched"]["work_bound"] == pytest.approx(1 / (1 - result["skip"]["decode_saving"]))
    assert toy["methods"]["full"]["speed"]["decode_speedup"] == 1.0
    assert toy["methods"]["full"]["batched"]["decode_speedup"] == 1.0
    vs = {name: result["vs"] for name, result in toy["methods"].items()}
    assert set(vs["full"]) == {"lora-only"} and set(vs["lora-only"]) == {"full"}
    assert all(set(vs[name]) == {"full", "lora-only"} for name in toy["methods"] if name not in ("full", "lora-only"))
    for name, ratios in vs.items():
        for ref, r in ratios.items():
            score, below = (toy["methods"][m]["metrics"]["accuracy"]["score"] for m in (name, ref))
            assert r is None if below == 0 else r["ratio"] == pytest.approx(score / below) and r["low"] <= r["ratio"] <= r["high"]
    assert len(toy["layer_keep_rate"]) == results["num_layers"] and toy["layer_keep_rate"][0] == 1.0
    table = (out / "results.md").read_text()
    assert "| method | toy (accuracy) | toysum (rougeL) |" in table and "| shortgpt | " in table
    assert "| method / reference | toy | toysum |" in table and "| first / lora-only | " in table
    assert "| method | toy (accuracy) | toysum (rougeL) | mixed workload |" in table and "saves " in table
    mix = results["mixed"]
    assert mix["reference"] == "lora-only" and mix["items"] == 8 + 4 and set(mix["methods"]) == set(toy["methods"])
    steps = sum(ds["methods"]["first"]["skip"]["decode_steps"] for ds in results["datasets"].values())
    saved = sum(ds["methods"]["first"]["skip"]["saved_layer_steps"] for ds in results["datasets"].values())
    assert mix["methods"]["first"]["decode_saving"] == pytest.approx(saved / (results["num_layers"] * steps))
    assert mix["methods"]["full"]["decode_saving"] == 0.0
    scores = {n: {m: r["metrics"][ds["primary_metric"]]["score"] for m, r in ds["methods"].items()}
              for n, ds in results["datasets"].items()}
    kept = None if scores["toy"]["lora-only"] == 0 or scores["toysum"]["lora-only"] == 0 else \
        (8 * scores["toy"]["first"] / scores["toy"]["lora-only"] + 4 * scores["toysum"]["first"] /
         scores["toysum"]["lora-only"]) / 12  # quality kept over the reference, items-weighted
    assert mix["methods"]["first"]["quality"] == (None if kept is None else pytest.approx(kept))
    for png in ("pareto.png", "layer_usage.png", "skip_counts.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_draws_the_routers_decisions(run, data, tmp_path, evaluated):
    out, results = evaluated
    found = inspect_run(run, [str(data["toy"])], tmp_path / "layers.png", batch_size=3, progress=False)
    assert (tmp_path / "layers.png").is_file()
    assert found["toy"]["layer_keep_rate"] == pytest.approx(results["datasets"]["toy"]["layer_keep_rate"])


def test_a_run_without_lora_skips_the_lora_methods(tiny_base, data, tmp_path):
    bare = make_run(tiny_base, tmp_path / "run", adapter=False)
    results = evaluate_run(bare, [str(data["toy"])], "full,lora-only,first,first-nolora", limit=3,
                           out_dir=tmp_path / "eval", max_new_tokens=2, progress=False)
    toy = results["datasets"]["toy"]
    assert list(toy["methods"]) == ["full", "first"] and set(toy["not_run"]) == {"lora-only", "first-nolora"}


# -- resuming -------------------------------------------------------------------------------

def test_resume_recomputes_nothing_finished(run, data, tmp_path, monkeypatch):
    generated: list[int] = []
    real = runner.decode_batch

    def counting(fsm, pre, *args, **kwargs):
        generated.append(pre.skip.shape[0])
        return real(fsm, pre, *args, **kwargs)

    monkeypatch.setattr(runner, "decode_batch", counting)
    args = dict(methods="lora-only,first", out_dir=tmp_path, batch_size=2, max_new_tokens=2, speed_items=0,
                progress=False)
    evaluate_run(run, [str(data["toy"])], limit=4, **args)
    assert sum(generated) == 8
    before = (tmp_path / "predictions" / "toy" / "first.jsonl").read_text()
    with (tmp_path / "predictions" / "toy" / "first.jsonl").open("a") as f:
        f.write('{"id": "test-3", "predic')  # killed mid-write
    generated.clear()
    evaluate_run(run, [str(data["toy"])], limit=4, **args)
    assert generated == [] and (tmp_path / "predictions" / "toy" / "first.jsonl").read_text() == before
    evaluate_run(run, [str(data["toy"])], limit=6, **args)
    assert sum(generated) == 4  # the two new items, by two methods
    evaluate_run(run, [str(data["toy"])], limit=6, **{**args, "max_new_tokens": 3})
    assert sum(generated) == 4 + 12  # a changed setting makes every item stale


def test_an_interrupted_evaluation_resumes_where_it_stopped(run, data, tmp_path, monkeypatch):
    real, calls = runner.decode_batch, []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "decode_batch", dies_on_third)
    args = dict(methods="lora-only,first", limit=6, out_dir=tmp_path, batch_size=2, max_new_tokens=2, speed_items=0,
                progress=False)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, [str(data["toy"])], **args)
    monkeypatch.setattr(runner, "decode_batch", real)
    results = evaluate_run(run, [str(data["toy"])], **args)
    lines = (tmp_path / "predictions" / "toy" / "lora-only.jsonl").read_text().splitlines()
    assert len(lines) == 6 and results["datasets"]["toy"]["methods"]["lora-only"]["batched"]["batches"] == 3


def test_methods_sharing_a_prefill_generate_what_each_generates_alone(run, data):
    models = runner.load_models(run, parse_methods("full,first-nolora,random,uls"))
    fsm = models.base
    prompts = [fsm.encode(f"Review: {s}\nPositive or negative?") for s in SENTENCES[:3]]
    methods = parse_methods("full,first-nolora,random,uls")
    skips = {"full": [[]] * 3, "first-nolora": [None] * 3, "random": [[1, 3]] * 3, "uls": [[2], [1, 4], []]}
    sampling = Sampling(max_new_tokens=6)
    shared = runner.generate_methods(fsm, methods, prompts, skips, sampling)
    for m in methods:
        alone, _ = runner.generate_batch(fsm, m, prompts, skips[m.name], sampling)
        together, _ = shared[m.name]
        assert [g.token_ids for g in together] == [g.token_ids for g in alone], m.name
        assert [g.skipped_layers for g in together] == [g.skipped_layers for g in alone], m.name
    assert shared["uls"][0][1].skipped_layers == [1, 4]


def test_speed_is_timed_one_prompt_at_a_time_to_a_fixed_length_and_resumes(run, data, tmp_path, monkeypatch):
    real, timed = runner.generate_batch, []

    def recording(fsm, m, prompts, skips, sampling, stop_at_eos=True):
        gens, timing = real(fsm, m, prompts, skips, sampling, stop_at_eos)
        if not stop_at_eos:
            timed.append((m.name, len(prompts), [g.new_tokens for g in gens], timing["decode_row_steps"]))
        return gens, timing

    monkeypatch.setattr(runner, "generate_batch", recording)
    args = dict(methods="full,first", limit=4, out_dir=tmp_path, batch_size=4, max_new_tokens=2, progress=False)
    results = evaluate_run(run, [str(data["toy"])], speed_items=3, **args)
    tokens = runner.SPEED_TOKENS
    warm_up = [("full", 1, [tokens], tokens - 1)]  # untimed, before the timed runs
    interleaved = [(m, 1, [tokens], tokens - 1) for _ in range(3) for m in ("full", "first")]
    assert timed == warm_up + interleaved
    first = results["datasets"]["toy"]["methods"]["first"]["speed"]
    assert first["prompts"] == 3 and first["decode_speedup"] > 0
    timed.clear()
    evaluate_run(run, [str(data["toy"])], speed_items=3, **args)
    assert timed == []  # resumed: nothing timed again
    evaluate_run(run, [str(data["toy"])], speed_items=4, **args)
    assert [name for name, *_ in timed] == ["full", "full", "first"]  # a warm-up, then the new prompt


def test_batched_throughput_counts_the_row_steps_the_loop_ran():
    """The engine's loop drops a row when it ends; the fallback loop steps every row to the longest's end.
    Counting the latter for the former gave LoRA-only, which skips nothing, a 'speedup' of 2.34x."""
    def record(new: int, finish: str, rows: int) -> dict:  # this row's share of its batch's times
        return {"new_tokens": new, "finish": finish,
                "time": {"prefill_s": 1.0 / rows, "decode_s": 2.0 / rows, "batch_share": 1 / rows}}

    records = [record(2, "eos", 2), record(5, "length", 2), record(7, "length", 1)]
    batched = runner._batched(records, [[0, 1], [2]], rows_leave=True)
    assert batched["decode_tok_s"] == ((3 - 1) + (5 - 1) + (7 - 1)) / 4.0  # the EOS row sampled 3 tokens
    assert batched["batches"] == 2 and batched["ttft_s"] == 1.0
    padded = runner._batched(records, [[0, 1], [2]], rows_leave=False)
    assert padded["decode_tok_s"] == (2 * (5 - 1) + 1 * (7 - 1)) / 4.0


def test_store_keeps_the_last_record_and_checks_its_setting(tmp_path):
    store = PredictionStore(tmp_path / "m.jsonl")
    store.append([{"id": "a", "setting": {"skip": [1]}}, {"id": "a", "setting": {"skip": [2]}}])
    reread = PredictionStore(tmp_path / "m.jsonl")
    assert reread.finished("a", {"skip": [2]}) and not reread.finished("a", {"skip": [1]})
    assert not reread.finished("b", {"skip": [2]})


def test_row_steps_count_the_forwards_each_row_ran():
    def gen(n: int, skip: list[int], reason: str) -> Generation:
        return Generation(list(range(n)), skip, None, 5, reason)

    gens = [gen(3, [], "eos"), gen(1, [], "eos"), gen(5, [2], "length")]  # yield 4, 2 and 5 tokens
    assert runner._decode_row_steps(gens, rows_leave=True) == 3 + 1 + 4  # the first token is prefill's
    # the fallback loop: every row steps until the longest row has yielded its 5 -> 4 forwards x 3 rows
    assert runner._decode_row_steps(gens, rows_leave=False) == 12
    assert runner._decode_row_steps(gens[:2], rows_leave=False) == 2 * (4 - 1)  # EOS: sampled, not kept


def test_length_batches_sort_longest_first():
    assert runner.length_batches([3, 9, 1, 9, 4], 2) == [[1, 3], [4, 0], [2]]


# -- bad inputs -----------------------------------------------------------------------------

def test_a_bad_method_name_lists_the_valid_ones():
    with pytest.raises(FirstSkipError, match="unknown method 'bogus'; choose from: full, lora-only") as err:
        parse_methods("full, bogus")
    assert "shortgpt-per-example" in str(err.value) and "\n" not in str(err.value)
    assert [m.name for m in parse_methods("first,first, shortgpt")] == ["first", "shortgpt"]
    assert "uls-released-per-example" in method_names()


def test_bad_inputs_are_one_line_errors(run, data, tmp_path):
    no_routers = tmp_path / "no-routers"
    no_routers.mkdir()
    (no_routers / artifacts.CONFIG_NAME).write_text((run / artifacts.CONFIG_NAME).read_text())
    with pytest.raises(FirstSkipError, match="no routers.safetensors"):
        evaluate_run(no_routers, [str(data["toy"])], out_dir=tmp_path / "a")
    with pytest.raises(FirstSkipError, match="'reference'"):
        evaluate_run(run, [str(data["noref"])], out_dir=tmp_path / "b")
    with pytest.raises(FirstSkipError, match="share a name"):
        evaluate_run(run, [str(data["toy"]), str(data["toy"])], out_dir=tmp_path / "c")
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"run": "elsewhere", "identity": {"fingerprint": {}}}))
    with pytest.raises(FirstSkipError, match="another run"):
        evaluate_run(run, [str(data["toy"])], out_dir=other)


def test_cli_errors_are_one_line_with_exit_code_2(run, data, tmp_path):
    argv = ["eval", "--run", str(run), "--data", str(data["toy"]), "--out", str(tmp_path), "--methods", "full,laco"]
    out = subprocess.run([sys.executable, "-c", "from firstskip.cli import main; main()", *argv],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unknown method 'laco'" in out.stderr, out.stderr


def test_a_static_set_run_is_evaluated_as_a_rival_with_its_own_lora_and_set(run, tiny_base, data, tmp_path):
    from firstskip.train import train

    rival = train(str(tiny_base), [str(data["toy"])], tmp_path / "rival", lora=True, static="layers:2,3",
                  max_steps=1, batch_size=2, limit=4, max_length=48, progress=False)
    results = evaluate_run(run, [str(data["toy"])], "full,first", limit=4, out_dir=tmp_path / "eval",
                           batch_size=2, max_new_tokens=NEW_TOKENS, calibration_items=2, speed_items=0,
                           progress=False, rivals=[str(tmp_path / "rival")])
    assert set(results["datasets"]["toy"]["methods"]) == {"full", "first", "layers+lora"}
    stored = records(tmp_path / "eval", "toy", "layers+lora")
    assert len(stored) == 4 and all(r["skipped"] == [2, 3] for r in stored.values())
    prompts = load_examples(str(data["toy"]), "test", limit=4)
    expected = rival.generate([ex.prompt for ex in prompts], Sampling(max_new_tokens=NEW_TOKENS))
    assert [stored[ex.id]["new_tokens"] for ex in prompts] == [g.new_tokens for g in expected]
    with pytest.raises(FirstSkipError, match="not a static-set run"):
        evaluate_run(run, [str(data["toy"])], "full", out_dir=tmp_path / "eval2", rivals=[str(run)], progress=False)
