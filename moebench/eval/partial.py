"""Resumable evaluation: finished samples are appended to a partial file as each batch completes.

`results/<run>/.partial/<task>-<key>.jsonl` holds one JSON line per finished sample. The key hashes
what the predictions depend on (run, recipe hash, task name and version, data hash, limit, max new
tokens); batch size is left out because predictions do not depend on it (tested). A rerun with the
same arguments reads the file, skips those samples and computes the rest; once the task's Arrow
rows are written the partial file is deleted. A line cut short by a crash is ignored, and the next
writer starts on a fresh line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moebench.faults import fault_point


def partial_path(results_dir: Path, run: str, task: str, key_parts: dict) -> Path:
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(results_dir) / run / ".partial" / f"{task}-{key}.jsonl"


def read_partial(path: Path) -> dict[tuple[str, str], dict]:
    """{(split, question_id): record} of the samples a previous, interrupted run finished."""
    done: dict[tuple[str, str], dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # the last line of a crashed write
            continue
        if isinstance(r, dict) and "split" in r and "question_id" in r:
            done[(r["split"], r["question_id"])] = r
    return done


class PartialWriter:
    """Appends finished records: one write(2) per batch on an O_APPEND file, then fsync, so a batch is
    either whole or (after a crash) a cut-off last line that `read_partial` skips; on local file
    systems two evaluations appending to one file do not interleave within a batch."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if _ends_mid_line(path):  # a crashed write: end that line so the next record starts on its own
            os.write(self.fd, b"\n")

    def write(self, records: list[dict]) -> None:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        while data:  # one call unless interrupted (a short write to a regular file is rare)
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)
        fault_point("partial")

    def close(self) -> None:
        os.close(self.fd)


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
