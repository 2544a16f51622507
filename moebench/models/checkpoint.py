"""Model checkpoints: safetensors weights + the configs that rebuild the exact variant + the tokenizer.

Layout of a model directory:
    model.safetensors   weights
    model.json          {"model": ModelConfig, "vision_config": HF dict, "llm_config": HF dict, "variant", ...}
                        or, for a vision recipe's model, {"kind": "vision", "vit": ViTConfig, "classes", ...}
    tokenizer/          the tokenizer (trained or copied from the checkpoint; VLMs only)
Directories are written into a temp dir and swapped into place (see `atomic_dir`), so a crash never
leaves half a model.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from moebench.config import ModelConfig, from_dict, to_dict
from moebench.errors import MissingFile, UserError
from moebench.faults import fault_point
from moebench.results import fsync_path

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Context: yields a temp dir beside `final`; on success the temp dir takes `final`'s place atomically.

    The files are fsynced first, then the temp dir is swapped with an existing `final` in one step
    (Linux renameat2 RENAME_EXCHANGE), so a crash leaves either the old directory or the new one,
    never half of either. Where the OS cannot swap, the old one is renamed away first: a crash in
    that window leaves the previous version under the hidden name `.{name}.old-{host}-{pid}`.
    Temp dirs `.{name}.tmp-{host}-{pid}-*` of processes killed on this host are removed by the
    next write into the same folder.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_owner()}-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("checkpoint")
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):  # tmp now holds the previous version
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = final.with_name(f".{final.name}.old-{_owner()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(final.parent)
    _remove_stale(final)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux / glibc < 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. a file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, so the rename publishes data that is on disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def _remove_stale(final: Path) -> None:
    """Remove what processes killed on this host left beside `final`: the temp dir of any write into
    this folder, and old copies of `final` itself (it is in place now)."""
    host = socket.gethostname()
    old = f".{final.name}.old-{host}-"
    for p in final.parent.iterdir():
        if p.name.startswith(old):
            owner = p.name[len(old):]
        else:
            owner = p.name.partition(f".tmp-{host}-")[2] if p.name.startswith(".") else ""
        pid = owner.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def save_vlm(model, cfg: ModelConfig, tokenizer, out_dir: Path, extra: dict | None = None,
             variant_config: dict | None = None) -> Path:
    """Write weights, configs and tokenizer. `variant_config`: the entries the variants' transforms need
    to be rebuilt (Variant.checkpoint_config: `moe`, `roe`, ...); a variant's entry is null when absent."""
    from safetensors.torch import save_model

    from moebench import variants

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        meta = {
            "model": to_dict(cfg),
            "vision_config": model.vision_tower.config.to_dict(),
            "llm_config": model.llm.config.to_dict(),
            **{v.stores: None for v in variants.VARIANTS.values() if v.stores},
            **(variant_config or {}),
            **(extra or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        tokenizer.save_pretrained(tmp / "tokenizer")
    return out_dir


def is_model_dir(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / MODEL_FILE).is_file()


def load_vlm(model_dir: Path, expect: ModelConfig | None = None, variant: str | None = None):
    """Rebuild the architecture from model.json and load the weights (safetensors only, never pickle).

    With `expect`, a checkpoint whose configuration differs from the recipe is an error; with
    `variant`, one whose structure (dense, MoE, RoE) is not that variant's. Each registered variant
    rebuilds its part of the module tree from its model.json entry (Variant.rebuild), in order.
    Returns (model, tokenizer, meta).
    """

    from moebench import variants
    from moebench.models.build import rebuild_vlm
    from moebench.models.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / META_FILE).is_file():
        raise MissingFile(model_dir / META_FILE, "model config", "point at a run directory made by `moebench train`")
    if not (model_dir / MODEL_FILE).is_file():
        raise MissingFile(model_dir / MODEL_FILE, "model weights",
                          "the checkpoint is incomplete: restore the file or train the run again")
    meta = _read_meta(model_dir / META_FILE)
    if meta.get("kind") == "vision":
        raise UserError(f"{model_dir} holds a vision model (a ViT with task heads), not a vision-language "
                        "model; evaluate it on classification or segmentation tasks")
    if variant is not None:
        _check_variant(meta, variant, model_dir)
    cfg = from_dict(ModelConfig, meta["model"], "model")
    if expect is not None and to_dict(expect) != to_dict(cfg):
        diff = _first_difference(to_dict(expect), to_dict(cfg))
        raise UserError(f"checkpoint {model_dir} does not match the recipe: {diff}")
    tokenizer = load_tokenizer(str(model_dir / "tokenizer"))
    model = rebuild_vlm(cfg, meta["vision_config"], meta["llm_config"], tokenizer)
    for v in variants.VARIANTS.values():
        v.rebuild(model, meta)
    load_weights(model, model_dir / MODEL_FILE)
    model.eval()
    return model, tokenizer, meta


def save_vision_model(model, recipe, out_dir: Path, extra: dict | None = None,
                      variant_config: dict | None = None) -> Path:
    """A vision recipe's model (moebench.vision.vit.ViTModel): weights, the backbone config, each head's
    classes and the variants' entries (as save_vlm)."""
    from safetensors.torch import save_model

    from moebench import variants

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        meta = {"kind": "vision", "vit": to_dict(recipe.vit), "classes": model.classes,
                **{v.stores: None for v in variants.VARIANTS.values() if v.stores},
                **(variant_config or {}), **(extra or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return out_dir


def load_vision_model(model_dir: Path, expect=None, variant: str | None = None):
    """Rebuild a vision model from model.json (backbone, heads, the variants' blocks) and load its
    weights. With `expect` (a ViTConfig), a checkpoint of another backbone is an error. Returns (model, meta)."""
    import dataclasses

    from moebench import variants
    from moebench.config import ViTConfig
    from moebench.vision.vit import ViTModel, build_vit

    model_dir = Path(model_dir)
    for name, what in ((META_FILE, "model config"), (MODEL_FILE, "model weights")):
        if not (model_dir / name).is_file():
            raise MissingFile(model_dir / name, what, "point at a run directory made by `moebench train`")
    meta = _read_meta(model_dir / META_FILE)
    if variant is not None:
        _check_variant(meta, variant, model_dir)
    cfg = from_dict(ViTConfig, meta["vit"], "vit")
    if expect is not None and to_dict(expect) != to_dict(cfg):
        raise UserError(f"checkpoint {model_dir} does not match the recipe: "
                        f"{_first_difference(to_dict(expect), to_dict(cfg), 'vit')}")
    model = ViTModel(build_vit(dataclasses.replace(cfg, pretrained=None)), meta["classes"])  # weights load below
    for v in variants.VARIANTS.values():
        v.rebuild(model, meta)
    load_weights(model, model_dir / MODEL_FILE)
    model.eval()
    return model, meta


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the checkpoint is damaged, train the run again") from None
    keys = ("vit", "classes") if isinstance(meta, dict) and meta.get("kind") == "vision" else (
        "model", "vision_config", "llm_config")
    missing = [k for k in keys if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{path}: not a moebench model config (no {', '.join(missing)}); "
                        "point at a model directory made by `moebench train`")
    return meta


def _check_variant(meta: dict, variant: str, model_dir: Path) -> None:
    """The model.json entries set (`moe`, `roe`, ...) are those the variant's chain stores (STGC: an MoE model)."""
    from moebench import variants

    if variant not in variants.VARIANTS:
        return
    want = {v.stores for v in variants.chain(variant) if v.stores}
    if variants.stored(meta) != want:
        found = variants.structure_name(meta)
        raise UserError(f"{model_dir} holds {found} model, but its run says variant={variant}; "
                        "point at the run directory that trained it")


def load_weights(model, path: Path, strict: bool = True) -> None:
    """Load safetensors weights (never pickle); an unreadable file or a key or shape mismatch is a
    one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MissingFile(path, "weights file", "the checkpoint is incomplete: restore the file or train again")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        if _is_pickle(path):
            raise UserError(f"{path} is a pickle (torch.save) file, not safetensors; moebench never unpickles "
                            "weights: convert it with safetensors.torch.save_file") from None
        raise UserError(f"{path} is not a readable safetensors file ({e}); it is incomplete or damaged: "
                        "restore it or train again") from None
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise UserError(f"checkpoint {path} does not match the model: {k} has shape {tuple(v.shape)}, "
                            f"the recipe builds {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (lm_head = embeddings) are stored once: a missing key is fine if it shares storage
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded]
    if strict and (missing or unexpected):
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"checkpoint {path} does not match the model its config builds: {what} "
                        "(weights of another variant or size?)")


def _is_pickle(path: Path) -> bool:
    """torch.save's zip archive, or a bare pickle (protocol 2-5: PROTO, version, then an opcode; a
    safetensors file starts with its little-endian header length, whose third byte is 0 below 64 KiB)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or (len(head) == 4 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0)


def _first_difference(a, b, prefix="model") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix} is {b!r} in the checkpoint, {a!r} in the recipe"
