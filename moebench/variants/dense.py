"""The dense LLaVA model: no section, no transform, no extra loss; every hook is the base class's no-op."""

from __future__ import annotations

from moebench.variants.base import Variant


class Dense(Variant):
    name = "dense"
    structure = "a dense"


DENSE = Dense()

