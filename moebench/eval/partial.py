"""Resumable evaluation: finished samples are appended to a partial file as each batch completes.

`results/<run>/.partial/<task>-<key>.jsonl` holds one JSON line per finished sample. The key hashes
what the predictions depend on (run, recipe hash, task name and version, data hash, limit, max new
tokens); batch size is left out because predictions do not depend on it (tested). A rerun with the
same arguments reads the file, skips those samples and computes the rest; once the task's Arrow
rows are written the partial file is deleted. A line cut short by a crash is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def partial_path(results_dir: Path, run: str, task: str, key_parts: dict) -> Path:
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(results_dir) / run / ".partial" / f"{task}-{key}.jsonl"


def read_partial(path: Path) -> dict[tuple[str, str], dict]:
    """{(split, question_id): record} of the samples a previous, interrupted run finished."""
    done: dict[tuple[str, str], dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # the last line of a crashed write
            continue
        done[(r["split"], r["question_id"])] = r
    return done


class PartialWriter:
    """Appends finished records, flushed and fsynced per batch."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")

    def write(self, records: list[dict]) -> None:
        for r in records:
            self.f.write(json.dumps(r) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
