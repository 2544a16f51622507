"""Where data comes from: the embedded shapes world (generated on first use) or a real data root."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from moebench.config import WorldConfig
from moebench.errors import MissingFile

DATA_ENV = "MOEBENCH_DATA"


@dataclass
class DataSource:
    root: Path
    name: str  # "shapes" or the data root
    hash: str  # content hash of the world; for real roots, filled per file by `file_hash`


def resolve(source: str | None, world: WorldConfig, progress: bool = True) -> DataSource:
    """`shapes` -> the embedded world; anything else is a data root directory (or $MOEBENCH_DATA)."""
    source = source or os.environ.get(DATA_ENV) or "shapes"
    if source == "shapes":
        from moebench.data.shapes import WorldSpec, ensure_world, world_hash

        root = ensure_world(WorldSpec(**dataclasses.asdict(world)), progress=progress)
        return DataSource(root=root, name=f"shapes-v{_world_version()}-seed{world.seed}", hash=world_hash(root))
    root = Path(source).expanduser()
    if not root.is_dir():
        raise MissingFile(root, "data root", "point data.source (a recipe) or --data (eval) at a directory holding the "
                          f"datasets, or at shapes (or set ${DATA_ENV})")
    return DataSource(root=root, name=str(root), hash="")


def _world_version() -> int:
    from moebench.data.shapes import WORLD_VERSION

    return WORLD_VERSION


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]
