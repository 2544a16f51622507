"""Parameter accounting: total and activated per token, per part (LLM, vision tower, projector).

Conventions (DESIGN section 5): MoE-LLaVA counts the whole LLM, embeddings included; we report the
embedding count beside it so either convention can be read off. A dense model activates everything.
"""

from __future__ import annotations


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params(model) -> dict:
    """{'total', 'activated', 'llm', 'llm_embeddings', 'vision', 'projector', 'embeddings_counted'}."""
    llm = _count(model.llm)  # parameters() de-duplicates tied lm_head / embeddings
    emb = model.llm.get_input_embeddings().weight.numel()
    out_emb = model.llm.get_output_embeddings()
    if out_emb is not None and out_emb.weight is not model.llm.get_input_embeddings().weight:
        emb += out_emb.weight.numel()
    parts = {"llm": llm, "llm_embeddings": emb, "vision": _count(model.vision_tower), "projector": _count(model.projector)}
    total = parts["llm"] + parts["vision"] + parts["projector"]
    return {"total": total, "activated": total, **parts, "embeddings_counted": True}
