"""Model checkpoints: safetensors weights + the configs that rebuild the exact variant + the tokenizer.

Layout of a model directory:
    model.safetensors   weights
    model.json          {"model": ModelConfig, "vision_config": HF dict, "llm_config": HF dict, "variant", ...}
    tokenizer/          the tokenizer (trained or copied from the checkpoint)
Directories are written into a temp dir and renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from moebench.config import ModelConfig, from_dict, to_dict
from moebench.errors import MissingFile, UserError

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"


def atomic_dir(final: Path):
    """Context: yields a temp dir next to `final`; on success it replaces `final` atomically."""

    class _Ctx:
        def __enter__(self):
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old.{os.getpid()}")
                os.replace(final, old)
            os.replace(self.tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False

    return _Ctx()


def save_vlm(model, cfg: ModelConfig, tokenizer, out_dir: Path, extra: dict | None = None,
             moe=None, roe=None) -> Path:
    """Write weights, configs and tokenizer; `moe` / `roe` (their configs) when the LLM was transformed."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        meta = {
            "model": to_dict(cfg),
            "vision_config": model.vision_tower.config.to_dict(),
            "llm_config": model.llm.config.to_dict(),
            "moe": to_dict(moe) if moe is not None else None,
            "roe": to_dict(roe) if roe is not None else None,
            **(extra or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        tokenizer.save_pretrained(tmp / "tokenizer")
    return out_dir


def is_model_dir(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / MODEL_FILE).is_file()


def load_vlm(model_dir: Path, expect: ModelConfig | None = None):
    """Rebuild the architecture from model.json and load the weights (safetensors only, never pickle).

    With `expect`, a checkpoint whose configuration differs from the recipe is an error.
    Returns (model, tokenizer, meta).
    """

    from moebench.models.build import rebuild_vlm
    from moebench.models.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if not is_model_dir(model_dir):
        raise MissingFile(model_dir / META_FILE, "moebench model", "point at a run directory made by `moebench train`")
    meta = json.loads((model_dir / META_FILE).read_text())
    cfg = from_dict(ModelConfig, meta["model"], "model")
    if expect is not None and to_dict(expect) != to_dict(cfg):
        diff = _first_difference(to_dict(expect), to_dict(cfg))
        raise UserError(f"checkpoint {model_dir} does not match the recipe: {diff}")
    tokenizer = load_tokenizer(str(model_dir / "tokenizer"))
    model = rebuild_vlm(cfg, meta["vision_config"], meta["llm_config"], tokenizer)
    if meta.get("moe"):
        from moebench.config import MoEConfig
        from moebench.moe.upcycle import upcycle

        upcycle(model.llm, from_dict(MoEConfig, meta["moe"], "moe"), empty=True)
    if meta.get("roe"):
        from moebench.config import RoEConfig
        from moebench.roe.model import add_roe

        add_roe(model, from_dict(RoEConfig, meta["roe"], "roe"))
    load_weights(model, model_dir / MODEL_FILE)
    model.eval()
    return model, tokenizer, meta


def load_weights(model, path: Path, strict: bool = True) -> None:
    """Load safetensors weights; shape or key mismatches are a one-line UserError."""
    from safetensors.torch import load_file

    state = load_file(str(path))
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
        raise UserError(f"checkpoint {path} does not match the model: {what}")


def _first_difference(a, b, prefix="model") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix} is {b!r} in the checkpoint, {a!r} in the recipe"
