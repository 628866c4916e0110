"""Resumable predictions: one JSON Lines file per dataset and method, appended and flushed per item.

Each record carries the ``setting`` it was made under (its skip set or decision rule, and
max_new_tokens). On restart an item counts as finished only if its last record has the setting
asked for now, so a stopped evaluation resumes where it stopped, and a changed budget recomputes
exactly the items it changes. The last record of an id wins; nothing is ever rewritten in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from firstskip.errors import FirstSkipError


def normalise(setting: dict[str, Any]) -> dict[str, Any]:
    """The setting as it reads back from JSON (tuples become lists), so comparisons are exact."""
    return json.loads(json.dumps(setting))


class PredictionStore:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = _read(self.path)

    def finished(self, item_id: str, setting: dict[str, Any]) -> bool:
        record = self.records.get(item_id)
        return record is not None and record["setting"] == setting

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, sort_keys=True) + "\n")
                out.flush()  # a kill loses at most the item being written
                self.records[record["id"]] = record


def _read(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    _drop_partial_line(path)
    records: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FirstSkipError(f"{path}:{number} is not valid JSON ({err.msg}); delete the file to "
                                     "recompute that method") from err
            records[record["id"]] = record
    return records


def _drop_partial_line(path: Path) -> None:
    """A kill mid-write leaves a line without its newline: cut it, so the next append starts clean."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
