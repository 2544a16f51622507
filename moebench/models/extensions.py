"""The two kinds of module through which a variant changes a model, so that the model code, the
parameter count, generation and the distributed set-up call them without naming a method.

- `RoutedBlock`: a block inside a network that sends each token to some of its parameters (an MoE
  block). Before each forward the VLM gives it the attention mask, so that padding stays out of
  routing; the parameter count asks it how many of its parameters one token leaves unused.
- `LMExtension`: a module a variant attaches to the VLM beside its language model (RoE's routing tokens
  and layer routers). It may run the language model itself for a forward, tidy the KV cache after a
  prefill, and add to the parameter count.
"""

from __future__ import annotations

import torch
from torch import nn


class RoutedBlock(nn.Module):
    """A module that routes tokens. `token_mask` (B, T): 1 for a real token, 0 for padding; None when
    every token is real."""

    token_mask: torch.Tensor | None = None

    def inactive_parameters(self) -> int:
        """Parameters of this block that one token does not use."""
        return 0


class LMExtension(nn.Module):
    """A variant's module beside the VLM's language model (a child of the VLM)."""

    # True when a data-parallel rank may leave some of its parameters without a gradient in a step
    # where another rank gives them one (e.g. a layer that every example of one rank skips)
    uneven_gradients: bool = False
    # True when evaluation should decode examples in batches of equal `decode_layout` key
    # (moebench.eval.generate.GroupedGeneration), e.g. because the key says which layers they skip
    groups_decoding: bool = False

    def run_lm(self, vlm, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *,
               input_ids: torch.Tensor, labels: torch.Tensor | None, cache, use_cache: bool,
               logits_to_keep, has_image: bool):
        """The language model's output for this forward, or None to let the VLM run it as usual."""
        return None

    def after_prefill(self, vlm, cache) -> None:
        """After the prompt's forward, before the first decoding step, on the generation's cache."""

    def parameter_counts(self, vlm, stats: dict | None) -> tuple[int, int]:
        """(added to the language model's total, added to its activated count). `stats`: what evaluation
        measured (the counters' entries), or None for the static count."""
        return 0, 0

    def decode_layout(self, vlm, cache, batch_size: int) -> tuple[list, list] | None:
        """After a prefill (and `after_prefill`), for generation that decodes examples of equal key together
        (moebench.eval.generate.GroupedGeneration): (per example a hashable key, per decoder layer
        (keys, values, rows) with rows[j] example j's row in those tensors or None where j skips the
        layer, or None for a layer no example ran). None: this extension does not group decoding."""
        return None

    def begin_decode(self, vlm, keys: list, partial: dict) -> None:
        """Before decoding a batch formed by grouped generation: `keys`, each row's decoding key (all equal
        unless pools smaller than a batch were decoded together); `partial`, per decoder layer that only
        some rows run, (keys, values) of those rows, in row order (the model's cache holds no entry for it)."""
