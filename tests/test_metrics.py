"""Metrics against hand-computed values, answer extraction from rambling outputs, bootstraps."""

import numpy as np
import pytest
import sacrebleu

from firstskip.errors import FirstSkipError
from firstskip.metrics import (
    TASK_METRICS,
    aggregate,
    bootstrap_ci,
    corpus_bootstrap_ci,
    evaluate_predictions,
    paired_ratio,
    extract_final_number,
    primary_metric,
    score_items,
)

# One tiny (predictions, references, choices) sample per task, shaped like the shared test.jsonl.
SAMPLES = {
    "summarization": (["Jane is back in Warsaw."], [["Jane is in Warsaw."]], None),
    "translation": (["And that is quite amazing."], [["And it's pretty amazing."]], None),
    "classification": (["Negative."], [["negative"]], [["negative", "positive"]]),
    "yesno": (["Yes, it is."], [["yes"]], [["no", "yes"]]),
    "qa_open": (["Alexandria Ocasio-Cortez"], [["Alexandria Ocasio-Cortez", "AOC"]], None),
    "math": (["16 * 4 = 64. The answer is 64."], [["64"]], None),
}
SENTENCE = "the quick brown fox jumps over the lazy dog"


def _one(task, prediction, references, choices=None):
    """Per-item scores of a single item, as {metric: score}."""
    per_item = score_items(task, [prediction], [references], None if choices is None else [choices])
    return {metric: values[0] for metric, values in per_item.items()}


# --- task table -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_METRICS)
def test_every_task_scores_its_metrics_primary_first(task):
    predictions, references, choices = SAMPLES[task]
    per_item = score_items(task, predictions, references, choices)
    assert tuple(per_item) == TASK_METRICS[task]
    assert primary_metric(task) == TASK_METRICS[task][0]
    results = evaluate_predictions(task, predictions, references, choices, n_resamples=50)
    for metric, result in results.items():
        assert 0.0 <= result["low"] <= result["score"] <= result["high"] <= 100.0, metric


def test_unknown_task_is_a_one_line_user_error():
    with pytest.raises(FirstSkipError, match="known tasks: summarization") as info:
        primary_metric("poetry")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_data_file_alias_qa_yesno_means_yesno():
    assert _one("qa_yesno", "Yes.", ["yes"], ["no", "yes"]) == {"accuracy": 100.0, "answered": 100.0}


@pytest.mark.parametrize(
    "predictions, references",
    [(["a", "b"], [["a"]]), (["a"], ["a"]), (["a"], [[]]), ([], [])],
    ids=["length mismatch", "flat references", "empty references", "no items"],
)
def test_malformed_inputs_are_user_errors(predictions, references):
    with pytest.raises(FirstSkipError):
        score_items("qa_open", predictions, references)


# --- summarization ------------------------------------------------------------------------------


def test_rouge_against_hand_computed_lcs():
    # Same four words, reordered: LCS is "the gunman" (2/4), one of three bigrams matches.
    scores = _one("summarization", "the gunman killed police", ["police killed the gunman"])
    assert scores == pytest.approx({"rougeL": 50.0, "rouge1": 100.0, "rouge2": 100.0 / 3})


def test_rouge_stems_and_takes_best_reference():
    assert _one("summarization", "running dogs", ["run dog"])["rouge1"] == pytest.approx(100.0)
    assert _one("summarization", "a b", ["x y", "a b"])["rougeL"] == pytest.approx(100.0)


# --- translation --------------------------------------------------------------------------------


def test_identical_translation_scores_100_and_disjoint_scores_0():
    identical = _one("translation", SENTENCE, [SENTENCE])
    assert identical == pytest.approx({"chrf": 100.0, "bleu": 100.0})
    # SENTENCE is a pangram, so only digits share no character n-gram with it.
    assert _one("translation", "1234 5678", [SENTENCE])["chrf"] == pytest.approx(0.0)


def test_translation_aggregate_is_sacrebleu_corpus_score():
    predictions = [SENTENCE, "a cat sat on a mat", "hello there"]
    references = [[SENTENCE], ["the cat sat on the mat"], ["hello world"]]
    per_item = score_items("translation", predictions, references)
    result = aggregate("translation", predictions, references, per_item)
    streams = [[refs[0] for refs in references]]
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, streams).score)


def test_corpus_bootstrap_brackets_corpus_score_and_handles_uneven_references():
    predictions = [SENTENCE, "a cat sat on a mat", "hello there", "good morning to you"] * 5
    cats = ["the cat sat on the mat", "a cat is on a mat"]
    references = [[SENTENCE], cats, ["hello world"], ["good morning"]] * 5
    score = aggregate("translation", predictions, references, {})["bleu"]
    low, high = corpus_bootstrap_ci("translation", "bleu", predictions, references, n_resamples=200)
    assert low <= score <= high and low < high
    perfect = corpus_bootstrap_ci("translation", "chrf", [SENTENCE] * 3, [[SENTENCE]] * 3)
    assert perfect == (100.0, 100.0)
    with pytest.raises(FirstSkipError, match="not a corpus metric"):
        corpus_bootstrap_ci("qa_open", "f1", predictions, references)


def test_paired_ratio_is_one_exactly_when_nothing_changes_however_the_items_vary():
    # Per-item ROUGE-L runs from 0 to 100 here, so each method's own interval is wide; paired, the same
    # predictions give exactly 1 on every resample.
    predictions = [SENTENCE, "a cat sat on a mat", "hello there", "nothing alike"] * 5
    references = [[SENTENCE], ["the cat sat on the mat"], ["hello world"], ["good morning"]] * 5
    assert paired_ratio("summarization", predictions, predictions, references) == {"ratio": 1.0, "low": 1.0, "high": 1.0}
    own = evaluate_predictions("summarization", predictions, references)["rougeL"]
    assert own["high"] - own["low"] > 20


def test_paired_ratio_divides_the_scores_and_brackets_the_ratio():
    references = [[SENTENCE], ["the cat sat on the mat"], ["hello world"], ["good morning"]] * 5
    baseline = [refs[0] for refs in references]
    worse = ["the quick brown fox", "the cat sat on the mat", "hello", "good morning"] * 5
    for task, metric in (("summarization", "rougeL"), ("translation", "chrf")):
        scores = [evaluate_predictions(task, p, references)[metric]["score"] for p in (worse, baseline)]
        r = paired_ratio(task, worse, baseline, references)
        assert r["ratio"] == pytest.approx(scores[0] / scores[1]) and r["ratio"] < 1, task
        assert r["low"] <= r["ratio"] <= r["high"] <= 1.0 and r["low"] < r["high"], task
    assert paired_ratio("yesno", ["yes"] * 4, ["no"] * 4, [["yes"]] * 4) is None  # the baseline scores 0


# --- open QA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, references, f1, em",
    [
        ("The Eiffel Tower!", ["eiffel tower"], 100.0, 100.0),  # case, article, punctuation
        ("in Paris, France", ["Paris"], 50.0, 0.0),  # P = 1/3, R = 1
        ("in Paris, France", ["Germany", "Paris France"], 80.0, 0.0),  # best ref: P = 2/3, R = 1
        ("Paris\nBecause the tower is there.", ["Paris"], 100.0, 100.0),  # first line only
        ("", ["Paris"], 0.0, 0.0),
    ],
)
def test_squad_f1_and_exact_match(prediction, references, f1, em):
    assert _one("qa_open", prediction, references) == pytest.approx({"f1": f1, "exact_match": em})


# --- math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, gold, correct",
    [
        ("The answer is $1,234.", "1234", True),
        ("It drops to -5 degrees.", "-5", True),
        ("x = 3.0", "3", True),
        ("Total: 0.50 liters", ".5", True),
        ("She has 18 eggs and eats 9", "18", False),  # the LAST number counts
        ("pages 3-4", "4", True),  # a hyphen is not a minus sign
        ("1,2,3", "3", True),  # commas in a list are not thousands
        ("Step 1 ... #### 72", "72", True),
        ("I cannot tell.", "5", False),
    ],
)
def test_math_final_number(prediction, gold, correct):
    assert _one("math", prediction, [gold]) == {"accuracy": 100.0 * correct}


def test_gold_may_be_a_gsm8k_solution():
    assert extract_final_number("so 16 * 4 = 64\n#### 64") == 64


# --- classification and yes/no ------------------------------------------------------------------

SST2_CHOICES = ["negative", "positive"]


@pytest.mark.parametrize(
    "prediction, gold, correct",
    [
        ("Negative.", "negative", True),
        ("The sentiment of this review is NEGATIVE, not positive.", "negative", True),
        ("Positive, though it has negative moments.", "negative", False),  # earliest label wins
        ("positively glowing", "positive", False),  # whole words only
        ("I cannot decide.", "negative", False),
    ],
)
def test_classification_takes_earliest_choice(prediction, gold, correct):
    assert _one("classification", prediction, [gold], SST2_CHOICES)["accuracy"] == 100.0 * correct


def test_classification_prefers_longer_label_and_falls_back_to_gold_labels():
    choices = ["entailment", "not entailment"]
    assert _one("classification", "Not entailment.", ["not entailment"], choices)["accuracy"] == 100
    predictions, references = ["It is positive.", "negative"], [["positive"], ["positive"]]
    per_item = score_items("classification", predictions, references)
    assert per_item["accuracy"] == [100.0, 0.0]


@pytest.mark.parametrize(
    "prediction, gold, choices, correct",
    [
        ("Yes, Durham joined in 2012.", "yes", ["no", "yes"], True),
        ("No.", "false", ["no", "yes"], True),  # references may say true/false
        ("True", "yes", None, True),  # so may the model
        ("Nope, not sure", "no", None, False),  # "no" must be a whole word
        ("no", "yes", None, False),
    ],
)
def test_yesno(prediction, gold, choices, correct):
    assert _one("yesno", prediction, [gold], choices)["accuracy"] == 100.0 * correct


@pytest.mark.parametrize("prediction, answered", [("Yes, it did.", True), ("It did, in 2012.", False),
                                                  ("Nope, not sure", False), ("False.", True)])
def test_answered_says_whether_the_answer_format_was_kept(prediction, answered):
    """A wrong label is still an answer; text without any label is a format failure (the base
    model's BoolQ failure that any LoRA fixes)."""
    assert _one("yesno", prediction, ["yes"], None)["answered"] == 100.0 * answered


# --- bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_of_constant_data_is_the_constant():
    assert bootstrap_ci(np.full(30, 0.3)) == pytest.approx((0.3, 0.3))


def test_bootstrap_of_half_correct_matches_normal_interval():
    # 400 items, half correct: standard error 2.5 points, so the 95% interval is about 50 +- 4.9.
    low, high = bootstrap_ci([0.0, 100.0] * 200)
    assert low == pytest.approx(45.1, abs=1.0) and high == pytest.approx(54.9, abs=1.0)


def test_bootstrap_is_deterministic_for_a_seed():
    data = np.random.default_rng(1).random(100)
    assert bootstrap_ci(data, seed=3) == bootstrap_ci(data, seed=3)
    assert bootstrap_ci(data, seed=3) != bootstrap_ci(data, seed=4)
    assert bootstrap_ci(data, statistic=np.median) != bootstrap_ci(data)


@pytest.mark.parametrize("kwargs", [{"per_item": []}, {"per_item": [1.0], "confidence": 1.0}])
def test_bootstrap_rejects_bad_arguments(kwargs):
    with pytest.raises(FirstSkipError):
        bootstrap_ci(**kwargs)
