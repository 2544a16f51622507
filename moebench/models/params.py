"""Parameter accounting: total and activated per token, per part (LLM, vision tower, projector).

Conventions: MoE-LLaVA counts the whole LLM, embeddings included; we report the
embedding count beside it so either convention can be read off. A dense model activates everything;
an MoE block activates its router, its shared expert and top_k of its num_experts routed experts
(moebench.models.extensions.RoutedBlock.inactive_parameters).
"""

from __future__ import annotations

from moebench.models.extensions import RoutedBlock


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def inactive_params(net) -> int:
    """Parameters a token does not use: each routed block's own count (an MoE block: (E - k) / E of its
    routed experts)."""
    return sum(m.inactive_parameters() for m in net.modules() if isinstance(m, RoutedBlock))


def count_params(model, stats: dict | None = None) -> dict:
    """{'total', 'activated', 'llm', 'llm_activated', 'llm_embeddings', 'vision', 'projector', 'embeddings_counted'}.

    The variants' extensions of the VLM add their own counts; `stats`, what evaluation measured (e.g. an
    RoE model's skip rate per layer), lets them count what examples actually activated."""
    llm = _count(model.llm)  # parameters() de-duplicates tied lm_head / embeddings
    emb = model.llm.get_input_embeddings().weight.numel()
    out_emb = model.llm.get_output_embeddings()
    if out_emb is not None and out_emb.weight is not model.llm.get_input_embeddings().weight:
        emb += out_emb.weight.numel()
    llm_activated = llm - inactive_params(model.llm)
    for ext in model.extensions():
        total, activated = ext.parameter_counts(model, stats)
        llm, llm_activated = llm + total, llm_activated + activated
    parts = {"llm": llm, "llm_activated": llm_activated, "llm_embeddings": emb,
             "vision": _count(model.vision_tower), "projector": _count(model.projector)}
    total = parts["llm"] + parts["vision"] + parts["projector"]
    activated = llm_activated + parts["vision"] + parts["projector"]
    return {"total": total, "activated": activated, **parts, "embeddings_counted": True}
