"""The dense LLaVA model: no section, no transform, no extra loss; every other hook is the base class's no-op."""

from __future__ import annotations

from moebench.variants.base import Variant


class Dense(Variant):
    name = "dense"
    kinds = ("lm", "vision")
    structure = "a dense"

    def plan(self, model, recipe) -> dict:
        return {"note": "dense: every parameter active"}


DENSE = Dense()

