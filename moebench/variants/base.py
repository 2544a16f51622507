"""The `Variant` interface: what one language-model method (dense, MoE, STGC, RoE) brings to a recipe.

A recipe's `variant:` names a chain of variants (`stgc` is `[moe, stgc]`: STGC trains an MoE model);
config, pipeline, stage loop, evaluator and checkpoint code call the methods below on every variant of
the chain, in order, and name none of them. A method is a no-op in this base class, so a variant
overrides only what it changes.

Order of calls in `moebench train` for stage i:
    validate(recipe)                       at load, for every registered variant (each checks its section)
    check_launch(recipe, world_size)       once, before any stage
    stage_key_part(recipe, i)              stage cache keys (config.stage_key)
    transform(model, recipe, i)            before an lm stage, when stage i is the variant's own stage
    param_parts(model)                     names a stage's `train:` list may use (besides the common ones)
    loss_fn(loss_fn, recipe, i)            wraps the stage's loss (adds terms, or replaces it)
    stage_hooks(net, recipe, i, parts)     before_step / after_backward / generators / close
    end_stage(model, recipe, i)            after the stage trained
    checkpoint_config(recipe, i)           entries of model.json that rebuild the module tree
and in `load_vlm` / `moebench eval`:
    rebuild(model, meta)                   from model.json, before the weights load
    counter(model)                         routing statistics while generating (eval rows' `extra`)
    activated_params(model, extra)         measured parameter counts, when the statistics define them
and in `moebench plan`:
    plan(model, recipe)                    transform a meta-device model as the final stage's is; say what it did
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

from moebench.errors import UserError

LossFn = Callable  # (model, batch) -> (loss, logs)


@dataclass
class StageHooks:
    """Per-step work of a variant that is not a loss term (see moebench.train.loop.run_stage)."""

    before_step: Callable[[int, int], None] | None = None  # (step, total) before each optimizer step
    after_backward: Callable[[float], dict] | None = None  # (scale) after each backward; returns logs
    generators: dict = field(default_factory=dict)  # RNGs saved with resumable checkpoints
    close: Callable[[], None] | None = None  # after the stage


class Counter(contextlib.AbstractContextManager):
    """Routing statistics gathered while a model generates: entered around the evaluation of a task."""

    def state(self):
        """What this process counted, picklable (gathered over ranks)."""
        return None

    def merge(self, states: list) -> None:
        """Replace the counts by the sum over every rank's `state()`."""

    def extra(self) -> dict:
        """Entries of the metric rows' `extra` (e.g. expert_load, skip_rate)."""
        return {}

    def __exit__(self, *exc):
        return False


class HookCounter(Counter):
    """A Counter around an object that counts while entered (hooks on the model): entering and leaving
    this one enters and leaves `inner`."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


class Variant:
    """One method. Class attributes describe it; methods are no-ops unless the variant changes that step."""

    name: str = ""  # the recipe's `variant:` value, the registry key
    kinds: tuple[str, ...] = ("lm",)  # the recipe kinds it applies to: lm (a VLM recipe), vision (a ViT recipe)
    builds_on: tuple[str, ...] = ()  # variants applied before this one (stgc builds on moe)
    section: str | None = None  # its recipe section (a field of config.Recipe), or None
    stage_flag: str | None = None  # the StageConfig flag that marks the stage applying `transform`
    stores: str | None = None  # its key in model.json (a transformed module tree), or None
    structure: str = ""  # how an error names a model with that key ("an MoE")
    param_names: tuple[str, ...] = ()  # module names it adds to a stage's `train:` (its param_parts' keys)
    separate_from_llm: tuple[str, ...] = ()  # param_parts that the `llm` part excludes
    commands: dict[str, Callable] = {}  # its benchmarks: `moebench bench NAME` -> a typer command function

    # ------------------------------------------------------------ recipe
    def validate(self, recipe) -> None:
        """Cross-field checks of its section (called for every registered variant); raise UserError."""

    def one_transform_stage(self, recipe) -> None:
        """Its section and the one stage that applies it (`stage_flag: true`) go together."""
        stages = [s.name for s in recipe.stages if getattr(s, self.stage_flag)]
        present = getattr(recipe, self.section) is not None
        if recipe.variant == self.name and (not present or not stages):
            raise UserError(f"variant={self.name} needs a `{self.section}:` section and one stage with "
                            f"`{self.stage_flag}: true`")
        if stages and not present:
            raise UserError(f"stages.{stages[0]}.{self.stage_flag} is true but the recipe has no "
                            f"`{self.section}:` section; add one")
        if len(stages) > 1:
            raise UserError(f"stages {stages} all set {self.stage_flag}; only one stage may (the model is "
                            "transformed once)")

    def stage_index(self, recipe) -> int | None:
        """The index of the stage that applies this variant (`stage_flag: true`), or None."""
        if self.stage_flag is None:
            return None
        return next((i for i, s in enumerate(recipe.stages) if getattr(s, self.stage_flag)), None)

    def applied(self, recipe, i: int) -> bool:
        """Whether stage i trains (and saves) the transformed model."""
        at = self.stage_index(recipe)
        return at is not None and i >= at

    def stage_key_part(self, recipe, i: int) -> dict:
        """What this variant adds to stage i's cache key (config.stage_key)."""
        return {}

    def check_launch(self, recipe, world_size: int) -> None:
        """Raise UserError when the variant cannot train with `world_size` processes."""

    # ------------------------------------------------------------ training
    def transform(self, model, recipe, i: int) -> str | None:
        """Change `model` in place before lm stage i (upcycle, add routers); return a line to print."""
        return None

    def param_parts(self, model) -> dict[str, list]:
        """Module names a stage's `train:` may use -> their parameters (empty lists when absent)."""
        return {}

    def loss_fn(self, loss_fn: LossFn, recipe, i: int) -> LossFn:
        """The loss of lm stage i: `loss_fn` (next-token loss and earlier variants' terms), wrapped or replaced."""
        return loss_fn

    def stage_hooks(self, net, recipe, i: int, kind: str, parts: dict[str, list]) -> StageHooks | None:
        """Per-step work of stage i on `net`, the module the step trains; `parts`: the stage's groups."""
        return None

    def end_stage(self, model, recipe, i: int) -> None:
        """After stage i trained, before the model is saved."""

    # ------------------------------------------------------------ checkpoints
    def checkpoint_config(self, recipe, i: int) -> dict:
        """Entries of model.json for the model after stage i, so that `rebuild` gives the same tree."""
        return {}

    def rebuild(self, model, meta: dict) -> None:
        """Given model.json's `meta`, transform a freshly built model like training did (weights load after)."""

    # ------------------------------------------------------------ evaluation
    def counter(self, model) -> Counter | None:
        """Routing statistics while `model` generates, or None."""
        return None

    def activated_params(self, model, extra: dict) -> dict | None:
        """Parameter counts measured from `extra` (the counters' entries), or None to keep the static count."""
        return None

    # ------------------------------------------------------------ plan
    def plan(self, model, recipe) -> dict:
        """For `moebench plan`: transform `model` (built on the meta device, no weights) as the recipe's
        final model is, and return what the plan reports: `note` (a phrase for the table), `stats`
        (statistics to count activated parameters with, as evaluation's counters give them) and any other
        entries for the plan's JSON."""
        return {}
