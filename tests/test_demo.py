"""`firstskip demo`'s table (the demo itself runs, with --quick, in the README test)."""

from __future__ import annotations

from firstskip.demo import table


def _method(score: float, saving: float, answered: float | None = None, speedup: float | None = None) -> dict:
    metrics = {"accuracy": {"score": score}}
    if answered is not None:
        metrics["answered"] = {"score": answered}
    return {"metrics": metrics, "skip": {"decode_saving": saving}, "speed": {"decode_speedup": speedup}}


def test_the_table_sets_first_beside_lora_only_and_its_rival_and_flags_a_format_failure():
    methods = {"full": _method(10, 0.0, answered=12), "lora-only": _method(70, 0.0, answered=100),
               "first": _method(72, 0.26, answered=100, speedup=1.21), "shortgpt+lora": _method(65, 0.27, answered=98)}
    results = {"datasets": {"boolq": {"task": "qa_yesno", "primary_metric": "accuracy", "methods": methods}}}
    lines = table(results)
    assert lines[2] == "| boolq | accuracy | 10.0 † | 70.0 | 72.0 | shortgpt+lora 65.0 | 0.26 / 0.27 | 1.21× |"
    assert lines[-1].startswith("† boolq: the full model answers with a label on 12% of items")


def test_a_yes_no_task_answered_below_a_coin_toss_is_flagged():
    """The packaged model answers "No" to nearly every BoolQ item of the demo: labels, but not the task's."""
    methods = {"full": _method(10, 0.0, answered=90), "lora-only": _method(75, 0.0),
               "first": _method(75, 0.49), "shortgpt+lora": _method(85, 0.27)}
    lines = table({"datasets": {"boolq": {"task": "qa_yesno", "primary_metric": "accuracy", "methods": methods}}})
    assert "10.0 †" in lines[2] and "below a coin toss's 50" in lines[-1]


def test_a_full_model_that_answers_in_format_is_not_flagged():
    methods = {"full": _method(60, 0.0, answered=95), "lora-only": _method(70, 0.0),
               "first": _method(72, 0.26), "shortgpt+lora": _method(65, 0.27)}
    lines = table({"datasets": {"boolq": {"task": "qa_yesno", "primary_metric": "accuracy", "methods": methods}}})
    assert len(lines) == 3 and "†" not in lines[2] and lines[2].endswith("| – |")
