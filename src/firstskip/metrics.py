"""Task quality metrics: per-item scores, corpus aggregates and percentile-bootstrap intervals.

This module sees prediction and reference strings, never models, prompts or dataset files. Answer
extraction for short-answer tasks lives here, so every caller scores a rambling model the same way.
Every metric is on a 0-100 scale (accuracy included) so result tables read alike.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from .errors import FirstSkipError

# Primary metric first: it is the one routers are selected on and tables lead with.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "summarization": ("rougeL", "rouge1", "rouge2"),
    "translation": ("chrf", "bleu"),
    "classification": ("accuracy", "answered"),  # answered: a label occurs at all (the answer format)
    "yesno": ("accuracy", "answered"),
    "qa_open": ("f1", "exact_match"),
    "math": ("accuracy",),
}
# Task names used by the shared data files that mean a task above (boolq records say "qa_yesno").
TASK_ALIASES: dict[str, str] = {"qa_yesno": "yesno"}
# Metrics whose corpus value is not the mean of per-item values.
CORPUS_METRICS: frozenset[str] = frozenset({"bleu", "chrf"})

_YESNO_SYNONYMS = {"true": "yes", "false": "no"}
_YESNO_LABELS = ("yes", "no", "true", "false")

Labels = Sequence[str] | None


def canonical_task(task: str) -> str:
    """Map a task name (or a data-file alias such as "qa_yesno") to a key of TASK_METRICS."""
    name = TASK_ALIASES.get(task, task)
    if name not in TASK_METRICS:
        known = ", ".join([*TASK_METRICS, *TASK_ALIASES])
        raise FirstSkipError(f"unknown task {task!r}; known tasks: {known}")
    return name


def primary_metric(task: str) -> str:
    """The metric a task is judged on (the first of TASK_METRICS[task])."""
    return TASK_METRICS[canonical_task(task)][0]


# ---------------------------------------------------------------------------------------------
# Answer extraction and normalisation
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so at one position "not entailment" wins over "entailment".
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def _normalise_label(label: str, yesno: bool) -> str:
    label = label.strip().lower()
    return _YESNO_SYNONYMS.get(label, label) if yesno else label


def extract_label(prediction: str, labels: Sequence[str], yesno: bool = False) -> str | None:
    """The label that occurs EARLIEST in the prediction (whole word, case-insensitive), normalised.

    Small instruct models wrap the answer in prose ("The sentiment is positive because..."), so an
    exact-match rule would score them near zero; the earliest label is what they answered first.
    For yes/no, "true"/"false" are accepted and mapped to "yes"/"no". None if no label occurs.
    """
    candidates = tuple(sorted({*labels, *_YESNO_LABELS} if yesno else set(labels)))
    if not candidates:
        return None
    match = _label_pattern(candidates).search(prediction)
    return _normalise_label(match.group(0), yesno) if match else None


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _first_line(text: str) -> str:
    # Models often put the short answer on the first line and an explanation after it.
    return next((line for line in text.splitlines() if line.strip()), "")


# A minus sign counts only where it cannot be a hyphen ("3-4" is 3 and 4); thousands need commas
# in groups of three so that a list "1,2,3" stays three numbers.
_NUMBER = re.compile(r"(?:(?<!\w)-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<!\w)-)?\.\d+")


def extract_final_number(text: str) -> Decimal | None:
    """The last number in the text, as a Decimal so that "3.0" == "3" and "1,234" == "1234"."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


# ---------------------------------------------------------------------------------------------
# Per-item scorers: (prediction, references, labels) -> {metric: score on 0-100}
# ---------------------------------------------------------------------------------------------


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imports nltk: only pay for it when summarising

    return rouge_scorer.RougeScorer(list(TASK_METRICS["summarization"]), use_stemmer=True)


@functools.cache
def _sacrebleu_metric(name: str, sentence: bool) -> BLEU | CHRF:
    # Sentence BLEU needs effective order, or any short sentence without a 4-gram match scores 0.
    if name == "bleu":
        return BLEU(effective_order=sentence)
    return CHRF()


def _score_summary(prediction: str, refs: Sequence[str], _labels: Labels) -> dict[str, float]:
    scores = _rouge_scorer().score_multi(list(refs), prediction)
    return {name: 100.0 * scores[name].fmeasure for name in TASK_METRICS["summarization"]}


def _score_translation(prediction: str, refs: Sequence[str], _labels: Labels) -> dict[str, float]:
    return {
        name: _sacrebleu_metric(name, sentence=True).sentence_score(prediction, list(refs)).score
        for name in TASK_METRICS["translation"]
    }


def _token_f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _score_qa(prediction: str, refs: Sequence[str], _labels: Labels) -> dict[str, float]:
    answer = _first_line(prediction)
    return {
        "f1": 100.0 * max(_token_f1(answer, ref) for ref in refs),
        "exact_match": 100.0 * any(normalize_answer(answer) == normalize_answer(r) for r in refs),
    }


def _score_math(prediction: str, refs: Sequence[str], _labels: Labels) -> dict[str, float]:
    predicted = extract_final_number(prediction)
    golds = {extract_final_number(ref) for ref in refs} - {None}
    return {"accuracy": 100.0 * (predicted is not None and predicted in golds)}


def _label_scorer(yesno: bool) -> Callable[[str, Sequence[str], Labels], dict[str, float]]:
    def score(prediction: str, refs: Sequence[str], labels: Labels) -> dict[str, float]:
        answer = extract_label(prediction, labels or (), yesno)
        golds = {_normalise_label(ref, yesno) for ref in refs}
        return {"accuracy": 100.0 * (answer in golds), "answered": 100.0 * (answer is not None)}

    return score


_ITEM_SCORERS: dict[str, Callable[[str, Sequence[str], Labels], dict[str, float]]] = {
    "summarization": _score_summary,
    "translation": _score_translation,
    "classification": _label_scorer(yesno=False),
    "yesno": _label_scorer(yesno=True),
    "qa_open": _score_qa,
    "math": _score_math,
}


# ---------------------------------------------------------------------------------------------
# Public scoring API
# ---------------------------------------------------------------------------------------------


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise FirstSkipError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not predictions:
        raise FirstSkipError("no predictions to score")
    if any(isinstance(refs, str) or not refs for refs in references):
        raise FirstSkipError("references must be non-empty lists of strings per item, e.g. [[ref]]")


def _default_labels(task: str, references: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Labels to search for when an item has no choices: yes/no, or every gold label seen."""
    if task == "yesno":
        return ("yes", "no")
    return tuple(sorted({ref.strip().lower() for refs in references for ref in refs}))


def score_items(
    task: str,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    choices: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, list[float]]:
    """Per-item scores (0-100) for every metric of the task.

    Classification and yes/no take the label that occurs earliest in the prediction (see
    `extract_label`) among the item's choices; without choices, yes/no searches "yes"/"no"
    (and "true"/"false") and classification searches every distinct reference label.
    Open QA scores the first non-empty line of the prediction; math compares final numbers.
    BLEU/chrF values here are sentence-level; `aggregate` gives the corpus-level values.

    Args:
        task: a key of TASK_METRICS or TASK_ALIASES.
        predictions: generated texts, one per item.
        references: gold strings per item (several for multi-reference items); best one counts.
        choices: per-item label lists for classification / yes-no (None entries allowed).
    """
    task = canonical_task(task)
    _check_inputs(predictions, references)
    if choices is not None and len(choices) != len(predictions):
        raise FirstSkipError(f"{len(choices)} choice lists for {len(predictions)} predictions")
    fallback = _default_labels(task, references) if task in ("classification", "yesno") else None
    item_choices = choices if choices is not None else [None] * len(predictions)
    scorer = _ITEM_SCORERS[task]
    rows = [
        scorer(pred, refs, labels or fallback)
        for pred, refs, labels in zip(predictions, references, item_choices)
    ]
    return {metric: [row[metric] for row in rows] for metric in TASK_METRICS[task]}


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    # sacrebleu wants one stream per reference slot; None pads items with fewer references.
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def _corpus_score(
    metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> float:
    scorer = _sacrebleu_metric(metric, sentence=False)
    return scorer.corpus_score(list(predictions), _reference_streams(references)).score


def aggregate(
    task: str,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    per_item: dict[str, Sequence[float]],
) -> dict[str, float]:
    """Corpus value of each metric: sacrebleu corpus BLEU/chrF, the per-item mean otherwise."""
    task = canonical_task(task)
    return {
        metric: _corpus_score(metric, predictions, references)
        if metric in CORPUS_METRICS
        else float(np.mean(per_item[metric]))
        for metric in TASK_METRICS[task]
    }


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------------------------


def _percentile_bootstrap(
    n_items: int,
    statistic_of: Callable[[np.ndarray], float],
    n_resamples: int,
    confidence: float,
    seed: int,
) -> tuple[float, float]:
    """Percentile interval of statistic_of(indices) over resamples of item indices."""
    if n_items < 1:
        raise FirstSkipError("bootstrap needs at least one item")
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise FirstSkipError(
            f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples} and {confidence}"
        )
    rng = np.random.default_rng(seed)
    # One resample at a time keeps memory at O(n_items) however many resamples are asked for.
    stats = np.array([statistic_of(rng.integers(0, n_items, n_items)) for _ in range(n_resamples)])
    tail = 50.0 * (1.0 - confidence)
    low, high = np.nanpercentile(stats, [tail, 100.0 - tail])  # nan: a ratio whose resample divides by 0
    return float(low), float(high)


def bootstrap_ci(
    per_item: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic` over items; deterministic for a given seed."""
    data = np.asarray(per_item, dtype=float)
    return _percentile_bootstrap(
        len(data), lambda idx: statistic(data[idx]), n_resamples, confidence, seed
    )


def corpus_bootstrap_ci(
    task: str,
    metric: str,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval of corpus BLEU/chrF: resample items, recompute the corpus score.

    Sentence statistics are extracted once and resamples only re-sum them (sacrebleu's own
    bootstrap does the same), so 1000 resamples of 500 sentences take well under a second.
    """
    if metric not in TASK_METRICS[canonical_task(task)] or metric not in CORPUS_METRICS:
        raise FirstSkipError(
            f"{metric!r} is not a corpus metric of task {task!r}; corpus metrics: "
            f"{', '.join(sorted(CORPUS_METRICS))} (use bootstrap_ci on per-item scores otherwise)"
        )
    _check_inputs(predictions, references)
    score_of = _subset_score(metric, predictions, references, {})
    return _percentile_bootstrap(len(predictions), score_of, n_resamples, confidence, seed)


def _subset_score(
    metric: str,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    per_item: dict[str, Sequence[float]],
) -> Callable[[np.ndarray], float]:
    """The metric's value over the items at some indices (repeats allowed), as `aggregate` computes it."""
    if metric not in CORPUS_METRICS:
        values = np.asarray(per_item[metric], dtype=float)
        return lambda idx: float(values[idx].mean())
    scorer = _sacrebleu_metric(metric, sentence=False)
    stats = np.array(scorer._extract_corpus_statistics(list(predictions), _reference_streams(references)))
    return lambda idx: scorer._compute_score_from_stats(stats[idx].sum(axis=0).tolist()).score


def paired_ratio(
    task: str,
    predictions: Sequence[str],
    baseline: Sequence[str],
    references: Sequence[Sequence[str]],
    choices: Sequence[Sequence[str] | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float] | None:
    """The primary metric of ``predictions`` over that of ``baseline`` on the same items, with a paired
    95% bootstrap interval: {"ratio", "low", "high"}; None when the baseline scores 0.

    Both are scored on the same resampled items, so the interval shows how far the two differ item by
    item, not how easy the sample is. On 100 summaries each method's own interval spans about
    ±3 ROUGE-L points, which says little about a 2-point gap between two methods; this one says it.
    """
    metric = primary_metric(task)
    score_of = [
        _subset_score(metric, preds, references, score_items(task, preds, references, choices))
        for preds in (predictions, baseline)
    ]
    everything = np.arange(len(predictions))
    if score_of[1](everything) <= 0:
        return None

    def ratio(idx: np.ndarray) -> float:
        below = score_of[1](idx)
        return score_of[0](idx) / below if below > 0 else float("nan")

    low, high = _percentile_bootstrap(len(predictions), ratio, n_resamples, 0.95, seed)
    return {"ratio": ratio(everything), "low": low, "high": high}


def evaluate_predictions(
    task: str,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    choices: Sequence[Sequence[str] | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score a task's predictions with a 95% bootstrap interval: {metric: {"score", "low", "high"}}.

    Args:
        task: a key of TASK_METRICS or TASK_ALIASES.
        predictions: generated texts, one per item.
        references: gold strings per item.
        choices: per-item label lists for classification / yes-no.
        n_resamples: bootstrap resamples per metric.
        seed: bootstrap seed; the same seed gives the same intervals.
    """
    per_item = score_items(task, predictions, references, choices)
    scores = aggregate(task, predictions, references, per_item)
    result = {}
    for metric, score in scores.items():
        score_of = _subset_score(metric, predictions, references, per_item)
        low, high = _percentile_bootstrap(len(predictions), score_of, n_resamples, 0.95, seed)
        result[metric] = {"score": score, "low": low, "high": high}
    return result
