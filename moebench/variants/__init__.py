"""Variants (`variant:` in a recipe), one module each, behind the `Variant` interface.

    dense  the LLaVA model as built                      moebench/variants/dense.py
    moe    MoE-LLaVA: FFNs upcycled into experts          moebench/variants/moe.py
    stgc   STGC on the MoE model (chain [moe, stgc])      moebench/variants/stgc.py
    roe    RoE: layers skipped per example                moebench/variants/roe.py
    vimoe  ViMoE: a ViT's block MLPs upcycled (vision)    moebench/variants/vimoe.py

gpu_bench.py is `moebench bench gpu`, which builds the dense, MoE and RoE models side by side.
`register` adds one (a test file may define its own, tests/test_toy_variant.py); `chain(name)` is the
list that config (stage keys), the pipeline (transforms, losses, the stage loop's hooks), the evaluator
(counters) and the checkpoint code (model.json entries) call in order. The order of registration is the
order of validation and of rebuilding a model from model.json (moe before roe).
"""

from __future__ import annotations

from moebench.errors import UserError
from moebench.registry import Registry, did_you_mean
from moebench.variants.base import Counter, HookCounter, StageHooks, Variant

VARIANTS: Registry[Variant] = Registry("variant")


def register(variant: Variant) -> Variant:
    """Add `variant` under its name (the recipe's `variant:` value); returns it."""
    VARIANTS.add(variant.name, variant)
    return variant


def get(name: str) -> Variant:
    return VARIANTS.get(name)


def chain(name: str) -> list[Variant]:
    """The variants `name` applies, in order: what it builds on first, then itself (stgc: [moe, stgc])."""
    v = VARIANTS.get(name)
    out: list[Variant] = []
    for base in v.builds_on:
        out += [b for b in chain(base) if b not in out]
    return [*out, v]


def check_name(name: str, kind: str = "lm") -> None:
    """The recipe's `variant:` is a registered one for a recipe of `kind` (lm or vision)."""
    names = [v.name for v in VARIANTS.values() if kind in v.kinds]
    if name not in names:
        where = f" in a {'vision' if kind == 'vision' else 'VLM'} recipe" if name in VARIANTS else ""
        raise UserError(f"variant={name!r} is not allowed{where}; choose one of {names}"
                        f"{did_you_mean(str(name), names)}")


def validate(recipe) -> None:
    """Every registered variant checks its own section and stage flag, then: a section the recipe's
    variant does not read is an error (it would be ignored, or train a variant under another's name)."""
    mine = [v for v in VARIANTS.values() if recipe.kind in v.kinds]
    for v in mine:
        v.validate(recipe)
    reads = {v.section for v in chain(recipe.variant) if v.section}
    sections = list(dict.fromkeys(v.section for v in mine if v.section))
    for section in sections:
        if getattr(recipe, section, None) is not None and section not in reads:
            users = [v.name for v in mine if section in {c.section for c in chain(v.name)}]
            raise UserError(f"variant={recipe.variant} does not use the `{section}:` section (variant "
                            f"{' or '.join(users)} does); remove the section or set variant={users[0]}")


def stored(meta: dict) -> set[str]:
    """The transformed structures a model.json records (its `moe`, `roe`, ... entries that are set)."""
    return {v.stores for v in VARIANTS.values() if v.stores and meta.get(v.stores)}


def structure_name(meta: dict) -> str:
    """'an MoE', 'an RoE' or 'a dense': how a message names the model a model.json describes."""
    has = stored(meta)
    return next((v.structure for v in VARIANTS.values() if v.stores in has), "a dense")


from moebench.variants import dense, moe, roe, stgc, vimoe  # noqa: E402

for _v in (dense.DENSE, moe.MOE, stgc.STGC_VARIANT, roe.ROE, vimoe.VIMOE):
    register(_v)

__all__ = ["VARIANTS", "Counter", "HookCounter", "StageHooks", "Variant", "chain", "check_name", "get", "register",
           "stored", "structure_name", "validate", "dense", "moe", "stgc", "roe", "vimoe"]
