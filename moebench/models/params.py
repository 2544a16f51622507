"""Parameter accounting: total and activated per token, per part (LLM, vision tower, projector).

Conventions: MoE-LLaVA counts the whole LLM, embeddings included; we report the
embedding count beside it so either convention can be read off. A dense model activates everything;
an MoE block activates its router, its shared expert and top_k of its num_experts routed experts.
"""

from __future__ import annotations


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def inactive_params(llm) -> int:
    """Routed-expert parameters a token does not use: (E - k) / E of every MoE block's experts."""
    from moebench.moe.layer import MoEBlock

    out = 0
    for m in llm.modules():
        if isinstance(m, MoEBlock):
            out += _count(m.experts) * (m.num_experts - m.top_k) // m.num_experts
    return out


def skipped_params(model, skip_rates: dict[str, float]) -> float:
    """RoE: parameters an example does not use on average, given each routable layer's measured skip
    rate: a skipped layer's weights, or a run layer's adapter."""
    roe = getattr(model, "roe", None)
    if roe is None:
        return 0.0
    out = 0.0
    for i, layer in zip(roe.layer_ids, roe.layers(model.llm)):
        rate = skip_rates.get(str(i), 0.0)
        out += rate * _count(layer.layer) + (1 - rate) * _count(layer.adapter)
    return out


def count_params(model, skip_rates: dict[str, float] | None = None) -> dict:
    """{'total', 'activated', 'llm', 'llm_activated', 'llm_embeddings', 'vision', 'projector', 'embeddings_counted'}.

    `skip_rates` (RoE, measured per routable layer) makes 'activated' the mean over examples; without
    them an RoE model counts as running every layer and no adapter."""
    llm = _count(model.llm)  # parameters() de-duplicates tied lm_head / embeddings
    emb = model.llm.get_input_embeddings().weight.numel()
    out_emb = model.llm.get_output_embeddings()
    if out_emb is not None and out_emb.weight is not model.llm.get_input_embeddings().weight:
        emb += out_emb.weight.numel()
    llm_activated = llm - inactive_params(model.llm)
    roe = getattr(model, "roe", None)
    if roe is not None:
        llm += _count(roe)  # the routing tokens live beside the LLM
        llm_activated += _count(roe) - round(skipped_params(model, skip_rates or {}))
        if not skip_rates:
            llm_activated -= sum(_count(layer.adapter) for layer in roe.layers(model.llm))
    parts = {"llm": llm, "llm_activated": llm_activated, "llm_embeddings": emb,
             "vision": _count(model.vision_tower), "projector": _count(model.projector)}
    total = parts["llm"] + parts["vision"] + parts["projector"]
    activated = llm_activated + parts["vision"] + parts["projector"]
    return {"total": total, "activated": activated, **parts, "embeddings_counted": True}
