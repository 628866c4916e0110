"""Budgets in decode work, calibration to them, the snapped decision, the oracle and static-set runs,
on a tiny random llama with SmolLM2's tokenizer (`test_evaluate`'s fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_evaluate import SENTENCES, make_run, records, tiny_base, write_jsonl  # noqa: F401  (fixture)
from typer.testing import CliRunner

from firstskip import artifacts, data
from firstskip.cli import app
from firstskip.engine import Sampling
from firstskip.errors import FirstSkipError
from firstskip.evaluate import evaluate_run, report, runner
from firstskip.evaluate.pareto import write_curves
from firstskip.modeling import FirstSkipModel
from firstskip.routers import nearest_set, set_mask
from firstskip.train import calibrate, held_out_examples
from firstskip.train.calibrate import learn_snap_sets, threshold_for_ratio, token_weighted_saving

TINY = "random:tiny-llama"
TRAIN_WORDS = ["crisp", "dull", "bright", "muddy", "warm", "cold", "sharp", "flat", "lively", "tired", "bold", "pale"]


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> Path:
    """Training prompts that no test prompt shares, so which split was read shows in the prompts."""
    root = tmp_path_factory.mktemp("data") / "reviews"
    train = [{"id": f"train-{i}", "task": "summarization", "prompt": f"Summarize: the {w} film was {w} .",
              "reference": f"a {w} film, " * (1 + i % 4)} for i, w in enumerate(TRAIN_WORDS)]
    test = [{"id": f"test-{i}", "task": "summarization", "prompt": f"Summarize: {s}", "reference": s}
            for i, s in enumerate(SENTENCES[:4])]
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    return root


@pytest.fixture()
def run(tiny_base, tmp_path) -> Path:
    return make_run(tiny_base, tmp_path / "run", adapter=True)


def _record(skipped: int, new_tokens: int, finish: str) -> dict:
    return {"skipped": list(range(1, skipped + 1)), "new_tokens": new_tokens, "finish": finish}


# -- token-weighted budgets -------------------------------------------------------------------

def test_token_weighted_saving_by_hand():
    # 10 layers. A: 3 skipped, 10 tokens (9 decode steps); B: 6 skipped, 1 token + a sampled EOS (1 step);
    # C: 4 skipped, 1 token at the limit (0 steps: prefill made it, no layer was skipped for it)
    items = [_record(3, 10, "length"), _record(6, 1, "eos"), _record(4, 1, "length")]
    budget = runner.decode_budget(items, num_layers=10)
    assert budget["decode_steps"] == 9 + 1 + 0 and budget["saved_layer_steps"] == 3 * 9 + 6 * 1
    assert budget["decode_saving"] == pytest.approx(33 / 100)
    assert budget["skip_ratio"] == pytest.approx((3 + 6 + 4) / 3 / 10)  # each prompt alike: BoolQ's skips count
    assert token_weighted_saving([3, 6, 4], [9, 1, 0], 10) == budget["decode_saving"]
    assert token_weighted_saving([5], [0], 10) == 0.0
    speed = {"ttft_s": 0.5, "decode_tok_s": 10.0}
    assert runner.latency(speed, items) == pytest.approx(0.5 + (9 + 1 + 0) / 3 / 10)
    assert runner.latency({"ttft_s": None, "decode_tok_s": None}, items) is None


def test_the_mixed_workload_pools_decode_steps_and_items():
    def method(score: float, saved: int, steps: int, ratio: float, latency: float) -> dict:
        return {"metrics": {"rougeL": {"score": score}},
                "skip": {"saved_layer_steps": saved, "decode_steps": steps, "skip_ratio": ratio},
                "speed": {"latency_s": latency}}

    results = {"num_layers": 10, "datasets": {
        "sum": {"items": 2, "primary_metric": "rougeL", "methods": {"lora-only": method(20.0, 0, 100, 0.0, 2.0),
                                                                     "first": method(18.0, 150, 100, 0.1, 1.6)}},
        "yes": {"items": 6, "primary_metric": "rougeL", "methods": {"lora-only": method(50.0, 0, 6, 0.0, 0.4),
                                                                     "first": method(50.0, 30, 6, 0.5, 0.4)}}}}
    mix = report.mixed(results)
    first = mix["methods"]["first"]
    assert mix["reference"] == "lora-only" and mix["items"] == 8
    assert first["decode_saving"] == pytest.approx((150 + 30) / (10 * 106))  # summaries dominate
    assert first["skip_ratio"] == pytest.approx((2 * 0.1 + 6 * 0.5) / 8)  # yes/no answers dominate
    assert first["latency_s"] == pytest.approx((2 * 1.6 + 6 * 0.4) / 8)
    assert first["quality"] == pytest.approx((2 * 18 / 20 + 6 * 1.0) / 8)


def test_pareto_curves_interpolate_between_operating_points():
    points = [(0.1, 20.0, None, None), (0.3, 10.0, None, None)]
    assert report.interpolate(points, 0.2) == pytest.approx(15.0)
    assert report.interpolate(points, 0.3) == 10.0 and report.interpolate(points, 0.4) is None
    table = report.equal_saving_table({"p": {"first": points, "shortgpt+lora": [(0.2, 12.0, None, None)]}})
    assert table["p"]["savings"] == [0.1, 0.2, 0.3]
    assert table["p"]["quality"]["first"] == pytest.approx([20.0, 15.0, 10.0])
    assert table["p"]["quality"]["shortgpt+lora"] == [None, 12.0, None]


# -- calibration ----------------------------------------------------------------------------

def test_threshold_for_a_weighted_ratio_counts_each_prompt_by_its_weight():
    config = FirstSkipModel.from_base(TINY).config  # 6 layers, 0 and 5 protected
    probs = torch.tensor([[0.9, 0.1, 0.2, 0.8, 0.7, 0.9], [0.9, 0.3, 0.6, 0.4, 0.5, 0.9]])
    # prompt 0 decodes 3 steps, prompt 1 one: skipping layer 1 of prompt 0 saves 3 of 6 x 4 layer-steps
    threshold = threshold_for_ratio(probs, config, 3 / 24, weights=[3, 1])
    skip = probs < threshold
    skip[:, [0, 5]] = False
    assert skip.sum(-1).tolist() == [1, 0]
    assert token_weighted_saving(skip.sum(-1).tolist(), [3, 1], 6) == pytest.approx(3 / 24)


def test_calibration_reaches_a_saving_target_and_never_reads_test_items(run, split_data, monkeypatch):
    splits: list[str] = []
    real = data._read

    def spying(spec: str, split: str):
        splits.append(split)
        return real(spec, split)

    monkeypatch.setattr(data, "_read", spying)
    out = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--data", str(split_data), "--limit", "12",
                                   "--saving-target", "0.3", "--snap", "2"])
    assert out.exit_code == 0, out.output
    assert splits and set(splits) == {"train"}
    result = json.loads(out.stdout)
    assert result["saving"] == pytest.approx(0.3, abs=0.08)  # as near as 12 prompts' decisions allow
    assert result["examples"] == 12 and result["saving_target"] == 0.3
    config = artifacts.load_config(run)
    assert config.threshold == result["threshold"] and config.decision == "threshold"
    assert config.snap_sets == result["snap"]["sets"] and 1 <= len(config.snap_sets) <= 2
    (split_data / "test.jsonl").rename(split_data / "hidden.jsonl")  # no test split at all: still calibrates
    try:
        assert CliRunner().invoke(app, ["calibrate", "-r", str(run), "--data", str(split_data), "--limit", "12",
                                        "--skip-target", "0.2"]).exit_code == 0
    finally:
        (split_data / "hidden.jsonl").rename(split_data / "test.jsonl")


def test_calibration_errors_are_one_line(run, split_data):
    examples = held_out_examples([str(split_data)], 4)
    with pytest.raises(FirstSkipError, match="exactly one"):
        calibrate(run, examples, skip_target=0.2, saving_target=0.2)
    with pytest.raises(FirstSkipError, match="saving target must lie in"):
        calibrate(run, examples, saving_target=1.5)


# -- the snapped decision -------------------------------------------------------------------

def test_nearest_set_breaks_ties_towards_fewer_skipped_layers_then_the_first():
    skip = set_mask([[1, 2]], 6)
    assert nearest_set(skip, set_mask([[1, 2, 3], [1]], 6)).tolist() == [1]  # both 1 away: the smaller
    assert nearest_set(skip, set_mask([[2], [1]], 6)).tolist() == [0]  # both 1 away, same size: the first
    assert nearest_set(skip, set_mask([[4], [1, 2, 4]], 6)).tolist() == [1]


def test_snap_sets_are_medoids_of_the_routers_sets_most_used_first():
    sets = [[1, 2]] * 3 + [[1, 2, 3], [4], [4], [3, 4]]
    learned = learn_snap_sets(set_mask(sets, 6), 2)
    assert learned == [[1, 2], [4]]
    assert all(s in [list(x) for x in sets] for s in learn_snap_sets(set_mask(sets, 6), 10))
    assert len(learn_snap_sets(set_mask(sets, 6), 10)) == 4  # no more sets than the routers chose


def test_snapped_decisions_are_among_the_stored_sets(run, split_data):
    result = calibrate(run, held_out_examples([str(split_data)], 12), skip_target=0.3, snap=3)
    fsm = FirstSkipModel.from_pretrained(run)
    stored = fsm.config.snap_sets
    assert stored == result.snap["sets"]
    prompts = [fsm.encode(f"Summarize: {s}") for s in SENTENCES]
    routed = fsm.engine.prefill(prompts)
    snapped = fsm.engine.prefill(prompts, config=fsm.config.replace(decision="snapped"))
    as_sets = [row.nonzero().squeeze(-1).tolist() for row in snapped.skip]
    assert all(s in stored for s in as_sets)
    assert snapped.skip.tolist() == set_mask(stored, 6)[nearest_set(routed.skip, set_mask(stored, 6))].tolist()
    fsm.update_config(decision="snapped")  # as generate --snapped
    gens = fsm.generate([f"Summarize: {s}" for s in SENTENCES[:3]], Sampling(max_new_tokens=2))
    assert all(g.skipped_layers in stored for g in gens)
    for sentence in SENTENCES[:2]:
        out = CliRunner().invoke(app, ["generate", "-r", str(run), "--snapped", "--json", "--max-new-tokens", "2",
                                       "--prompt", f"Summarize: {sentence}"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["skipped_layers"] in stored
    out = CliRunner().invoke(app, ["generate", "-r", str(run), "--snapped", "--budget", "0.3", "--prompt", "hi"])
    assert isinstance(out.exception, FirstSkipError) and "not --budget" in str(out.exception)
    with pytest.raises(FirstSkipError, match="calibrate --snap"):
        FirstSkipModel.from_base(TINY).update_config(decision="snapped")


def test_eval_snapped_and_oracle_methods(run, split_data, tmp_path, monkeypatch):
    seen: list[list[str]] = []
    real = runner.most_common_skip_set

    def spying(fsm, prompts, batch_size=8):
        seen.append(list(prompts))
        return real(fsm, prompts, batch_size)

    monkeypatch.setattr(runner, "most_common_skip_set", spying)
    args = dict(limit=4, batch_size=2, max_new_tokens=3, calibration_items=6, speed_items=0, progress=False)
    results = evaluate_run(run, [str(split_data)], "first,first-snapped,oracle", out_dir=tmp_path / "a", **args)
    ds = results["datasets"]["reviews"]
    assert set(ds["not_run"]) == {"first-snapped"} and "calibrate --snap" in ds["not_run"]["first-snapped"]
    # the oracle's set comes from held-out training prompts, never from the test items it is scored on
    train = {json.loads(line)["prompt"] for line in (split_data / "train.jsonl").read_text().splitlines()}
    test = {json.loads(line)["prompt"] for line in (split_data / "test.jsonl").read_text().splitlines()}
    assert len(seen) == 1 and len(seen[0]) == 6 and set(seen[0]) <= train and not set(seen[0]) & test
    oracle = ds["oracle"]
    assert oracle["split"] == "train" and oracle["prompts"] == 6
    assert all(r["skipped"] == oracle["layers"] for r in records(tmp_path / "a", "reviews", "oracle").values())
    assert ds["methods"]["oracle"]["skip"]["layers"] == oracle["layers"]
    assert "mixed workload" not in (tmp_path / "a" / "results.md").read_text()  # one dataset: nothing to mix

    calibrate(run, held_out_examples([str(split_data)], 12), snap=2)
    stored = artifacts.load_config(run).snap_sets
    results = evaluate_run(run, [str(split_data)], "first,first-snapped", out_dir=tmp_path / "b", **args)
    assert results["calibration"]["snap"]["sets"] == stored
    assert "calibrated for its threshold on 12 held-out training prompts" in (tmp_path / "b" / "results.md").read_text()
    snapped = records(tmp_path / "b", "reviews", "first-snapped")
    assert len(snapped) == 4 and all(r["skipped"] in stored for r in snapped.values())
    first = records(tmp_path / "b", "reviews", "first")
    stored_mask = set_mask(stored, 6)
    for item, r in first.items():  # the same keep-probabilities, snapped
        routed = set_mask([r["skipped"]], 6)
        nearest = stored_mask[nearest_set(routed, stored_mask)][0]
        assert snapped[item]["skipped"] == nearest.nonzero().squeeze(-1).tolist()
    table = write_curves([tmp_path / "a", tmp_path / "b"], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    panel = table["panels"]["reviews (rougeL)"]
    assert set(panel["quality"]) == {"first", "first-snapped", "oracle"}
    with pytest.raises(FirstSkipError, match="no results.json"):
        write_curves([tmp_path], tmp_path / "x.png")


# -- static-set runs ------------------------------------------------------------------------

def test_a_static_set_run_never_skips_outside_its_set(tiny_base, split_data, tmp_path):
    from firstskip.train import train

    fsm = train(str(tiny_base), [str(split_data)], tmp_path / "static", lora=True, static="layers:2,3",
                max_steps=1, batch_size=2, limit=4, max_length=48, progress=False)
    assert fsm.config.static_skip == [2, 3]
    fsm = FirstSkipModel.from_pretrained(tmp_path / "static")
    prompts = [f"Summarize: {s}" for s in SENTENCES[:4]]
    for change in ({"threshold": 1.0}, {"threshold": 0.0}, {"budget": 0.6}):
        fsm.set_decision(**change)
        assert all(g.skipped_layers == [2, 3] for g in fsm.generate(prompts, Sampling(max_new_tokens=2)))
    budget = fsm.config.replace(decision="budget", skip_ratio=0.9)
    pre = fsm.engine.prefill([fsm.encode(p) for p in prompts], config=budget)
    assert pre.skip.nonzero()[:, 1].unique().tolist() == [2, 3] and int(pre.skip.sum()) == 2 * len(prompts)
    with pytest.raises(FirstSkipError, match="static-set run"):
        calibrate(tmp_path / "static", held_out_examples([str(split_data)], 4), skip_target=0.2)
    shutil.rmtree(tmp_path / "static")
