"""The results schema, and the only code that writes or reads result files.

Three kinds of Arrow IPC files (`.arrow`, the IPC *file* format):
  metrics  one row per (run, task, split, metric): value, majority baseline, cost, provenance
  samples  one row per evaluated sample: prompt, prediction, target, score, latency, token counts
  train    one row per logged training step

Every write goes to a fresh file `{results_dir}/{run}/{kind}-{UTC time}-{pid}-{random}.arrow`, built
in a hidden temp file, fsynced and renamed into place, so a crash never leaves half a file and two
processes writing into one results directory never touch the same file. Files are never rewritten;
readers glob them all and `latest_rows` picks the newest row per key after a re-evaluation.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.ipc

from moebench.errors import MissingFile, UserError
from moebench.faults import fault_point

# 2: metrics gained `extra` (variant statistics)
# 3: metrics gained `torch_version` and `transformers_version` (provenance, beside `moebench_version`);
#    files of versions 1 and 2 read with those columns null. Samples and train tables are unchanged.
# 4: metrics gained `latency_ms` (mean wall time of one evaluation batch); vision rows (classification,
#    segmentation) leave the token timings `ttft_ms` / `tpot_ms` null. Older files read with it null.
# 5: metrics gained `protocol` (whose scoring rules: llava, official, lmms_eval) and `group` (an official
#    breakdown, e.g. "answer_type=yes/no"; null on the whole split). Older files read with them null.
SCHEMA_VERSION = 5

_str, _f64, _i64 = pa.string(), pa.float64(), pa.int64()


def _schema(kind: str, fields: list[tuple[str, pa.DataType, bool]]) -> pa.Schema:
    meta = {"moebench.kind": kind, "moebench.schema_version": str(SCHEMA_VERSION)}
    return pa.schema([pa.field(n, t, nullable=null) for n, t, null in fields], metadata=meta)


# (name, type, nullable). Non-nullable columns are the keys a row is meaningless without.
METRICS_SCHEMA = _schema("metrics", [
    ("run", _str, False),
    ("variant", _str, True),  # dense / moe / roe / stgc / vimoe
    ("task", _str, False),
    ("split", _str, False),
    ("metric", _str, False),
    ("value", _f64, False),
    ("baseline", _f64, True),  # the same metric for the majority-answer predictor
    ("n", _i64, True),
    ("dataset", _str, True),
    ("dataset_hash", _str, True),
    ("task_version", _i64, True),
    ("normalizer", _str, True),
    ("protocol", _str, True),  # llava (LLaVA-1.5 / MoE-LLaVA's scripts), official, lmms_eval
    ("group", _str, True),  # a breakdown of the split ("answer_type=number"), null for the whole split
    ("params_total", _i64, True),
    ("params_activated", _i64, True),
    ("params_detail", _str, True),  # JSON: llm / vision / projector, embeddings counted or not
    ("extra", _str, True),  # JSON: variant statistics, e.g. {"expert_load": {"0": [shares per expert]}}
    ("ttft_ms", _f64, True),  # generation: time to the first token of a batch (vision rows: null)
    ("tpot_ms", _f64, True),  # generation: time per output token after the first (vision rows: null)
    ("latency_ms", _f64, True),  # mean wall time of one batch: generation end to end, or a vision forward
    ("samples_per_s", _f64, True),
    ("peak_mem_mb", _f64, True),
    ("device", _str, True),
    ("dtype", _str, True),
    ("batch_size", _i64, True),
    ("threads", _i64, True),
    ("seed", _i64, True),
    ("git_commit", _str, True),
    ("moebench_version", _str, True),
    ("torch_version", _str, True),  # torch.__version__ with its build tag, e.g. 2.14.1+cu130
    ("transformers_version", _str, True),
    ("recipe", _str, True),
    ("recipe_hash", _str, True),
    ("timestamp", _str, False),  # ISO-8601 UTC, see utc_now()
])

SAMPLES_SCHEMA = _schema("samples", [
    ("run", _str, False),
    ("task", _str, False),
    ("split", _str, False),
    ("question_id", _str, False),
    ("image", _str, True),
    ("prompt", _str, True),
    ("prediction", _str, True),
    ("target", _str, True),
    ("score", _f64, True),
    ("latency_ms", _f64, True),
    ("ttft_ms", _f64, True),
    ("prompt_tokens", _i64, True),
    ("output_tokens", _i64, True),
    ("batch_size", _i64, True),
    ("timestamp", _str, True),  # so latest_rows can drop samples of an earlier evaluation
])

TRAIN_SCHEMA = _schema("train", [
    ("run", _str, False),
    ("stage", _str, False),
    ("step", _i64, False),
    ("epoch", _f64, True),
    ("loss", _f64, True),
    ("lm_loss", _f64, True),
    ("aux_loss", _f64, True),
    ("lr", _f64, True),
    ("tokens_per_s", _f64, True),
    ("elapsed_s", _f64, True),
    ("extra", _str, True),  # JSON: expert load, skip rate, ...
    ("timestamp", _str, True),  # so latest_rows can drop steps repeated after a resume
])

SCHEMAS: dict[str, pa.Schema] = {"metrics": METRICS_SCHEMA, "samples": SAMPLES_SCHEMA, "train": TRAIN_SCHEMA}
JSON_COLUMNS = ("params_detail", "extra")  # dict / list values are serialised with json.dumps


def utc_now() -> str:
    """The current time as ISO-8601 UTC with microseconds, e.g. 2025-01-31T12:00:00.000001+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _installed_version(module: str) -> str | None:
    """`module.__version__` if it is imported (the code that ran), else the installed distribution's
    version (no import), else None."""
    mod = sys.modules.get(module)
    version = getattr(mod, "__version__", None) if mod is not None else None
    if version is not None:
        return str(version)
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """The provenance columns of a metrics row: moebench, torch and transformers versions.

    The one place that gathers them; every writer of metrics rows spreads this into its rows. torch is
    imported here if it is not yet (every writer runs torch anyway): its `__version__` carries the build
    tag (`+cu130`, `+cpu`) that the distribution metadata may lack. transformers is not imported just
    for this; its distribution version is the same string."""
    from moebench import __version__

    if "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
    return {"moebench_version": __version__, "torch_version": _installed_version("torch"),
            "transformers_version": _installed_version("transformers")}


def _schema_for(kind: str) -> pa.Schema:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown results kind {kind!r}; one of {', '.join(SCHEMAS)}")
    return SCHEMAS[kind]


# -------------------------------------------------------------------------------------- writing


def _cell(name: str, value: Any) -> Any:
    if name in JSON_COLUMNS and isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    if name == "timestamp" and isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("timestamp: naive datetime; give a timezone-aware one (UTC)")
        return value.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return value


def rows_to_table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) -> a table with exactly `schema`. Missing keys are null; unknown keys, nulls in
    non-nullable columns and values of the wrong type raise ValueError naming the column."""
    known = set(schema.names)
    unknown = sorted({k for row in rows for k in row} - known)
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(map(repr, unknown))}; the schema has: {', '.join(schema.names)}")
    arrays = []
    for field in schema:
        values = [_cell(field.name, row.get(field.name)) for row in rows]
        if not field.nullable:
            missing = [i for i, v in enumerate(values) if v is None]
            if missing:
                raise ValueError(f"column {field.name!r} is required but missing/null in row(s) {missing[:10]}")
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ValueError(f"column {field.name!r} ({field.type}): {e}") from e
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table(rows: Sequence[dict], schema: pa.Schema, path: str | os.PathLike) -> Path:
    """Write rows as an Arrow IPC file at `path`, atomically.

    The table is built first (see `rows_to_table`), written to a hidden temp file in the same
    directory, fsynced, then `os.replace`d onto `path`; the directory is fsynced too. On any error
    the temp file is removed and whatever was at `path` before is untouched.
    """
    path = Path(path)
    table = rows_to_table(rows, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with pa.ipc.new_file(f, schema) as writer:
                writer.write_table(table)
            f.flush()
            os.fsync(f.fileno())
        fault_point("results")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_path(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` whole or not at all: a temp file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable on POSIX); best effort:
    folders cannot be opened this way on Windows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_run_name(run: str) -> None:
    if not run or run in (".", "..") or "/" in run or "\\" in run or "\0" in run:
        raise UserError(f"run name {run!r} must be a non-empty folder name without '/' or '\\'")


def new_results_path(results_dir: str | os.PathLike, kind: str, run: str) -> Path:
    """A fresh file name `{results_dir}/{run}/{kind}-{UTC time}-{pid}-{16 hex}.arrow` (the folder is
    created). Time, process id and 64 random bits make concurrent writers' names disjoint."""
    _schema_for(kind)
    _check_run_name(run)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    directory = Path(results_dir) / run
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{kind}-{stamp}-{os.getpid()}-{secrets.token_hex(8)}.arrow"


def append_rows(results_dir: str | os.PathLike, kind: str, run: str, rows: Sequence[dict]) -> Path:
    """Add rows to the results of `run`: a new file per call, never a rewrite of an existing one."""
    return write_table(rows, _schema_for(kind), new_results_path(results_dir, kind, run))


# -------------------------------------------------------------------------------------- reading


def find_files(paths_or_dirs: Iterable[str | os.PathLike], kind: str) -> list[Path]:
    """Result files of `kind`: files given as such, plus `**/{kind}-*.arrow` under each directory.
    Sorted and de-duplicated; a path that does not exist raises MissingFile."""
    _schema_for(kind)
    found: dict[Path, None] = {}
    for p in paths_or_dirs:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.glob(f"**/{kind}-*.arrow")):
                if f.is_file():
                    found.setdefault(f.resolve(), None)
        elif p.is_file():
            found.setdefault(p.resolve(), None)
        else:
            raise MissingFile(p, "results file or folder")
    return sorted(found)


def _read_one(path: Path, kind: str, schema: pa.Schema) -> pa.Table:
    try:
        with pa.OSFile(str(path), "rb") as f:
            table = pa.ipc.open_file(f).read_all()
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read results file {path}: {e}") from e
    meta = table.schema.metadata or {}
    file_kind = meta.get(b"moebench.kind", b"").decode() or None
    if file_kind is not None and file_kind != kind:
        raise UserError(f"results file {path} holds a {file_kind!r} table, not {kind!r}")
    required = [f.name for f in schema if not f.nullable and f.name not in table.schema.names]
    if required:
        raise UserError(f"results file {path} is not a {kind} table: no column(s) {', '.join(required)}")
    try:
        pa.unify_schemas([schema, table.schema])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UserError(f"results file {path} does not fit the {kind} schema: {e}") from e
    return table


def read_table(paths_or_dirs: Iterable[str | os.PathLike] | str | os.PathLike, kind: str) -> pa.Table:
    """All rows of `kind` under the given files / folders, as one table.

    Columns of the current schema come first (null where an older file lacks them); columns only
    some files have are kept. An unreadable or foreign file raises UserError naming it. No files:
    an empty table with the schema.
    """
    if isinstance(paths_or_dirs, (str, os.PathLike)):
        paths_or_dirs = [paths_or_dirs]
    schema = _schema_for(kind)
    tables = [schema.empty_table()]
    tables += [_read_one(p, kind, schema) for p in find_files(paths_or_dirs, kind)]
    table = pa.concat_tables(tables, promote_options="default")
    return table.replace_schema_metadata(schema.metadata)


def read_rows(paths_or_dirs: Iterable[str | os.PathLike] | str | os.PathLike, kind: str) -> list[dict]:
    """`read_table(...)` as a list of dicts."""
    return read_table(paths_or_dirs, kind).to_pylist()


def latest_rows(table: pa.Table, keys: Sequence[str] = ("run", "task", "split", "metric")) -> pa.Table:
    """Keep, per distinct `keys` value, the row with the newest timestamp (on a tie: the later row;
    a null timestamp counts as oldest). Row order of the kept rows is preserved."""
    import pyarrow.compute as pc

    if not keys:
        raise ValueError("latest_rows: give at least one key column")
    missing = [k for k in (*keys, "timestamp") if k not in table.column_names]
    if missing:
        raise ValueError(f"latest_rows: table has no column(s) {', '.join(missing)}")
    try:  # ISO-8601 with a zone offset (utc_now) -> UTC instants, compared as instants, not as text
        instants = pc.cast(table.column("timestamp"), pa.timestamp("us", tz="UTC")).cast(pa.int64())
    except pa.ArrowInvalid as e:
        raise UserError(f"a result row's timestamp is not ISO-8601 with a zone offset ({str(e).splitlines()[0]})") from None
    order = pa.table({**{k: table.column(k) for k in keys},
                      "__time": pc.fill_null(instants, pa.scalar(-(2 ** 63), pa.int64())),
                      "__row": pa.array(range(table.num_rows), pa.int64())})
    order = order.sort_by([("__time", "ascending"), ("__row", "ascending")])
    newest = order.group_by(list(keys), use_threads=False).aggregate([("__row", "last")])  # sorted: last = newest
    rows = newest.column("__row_last")
    return table.take(pc.take(rows, pc.sort_indices(rows)))
