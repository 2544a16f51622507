"""moebench plugs into transformers, torch and open_clip through their public extension points only.

Two checks, as DESIGN section 7 and issue 27 ask:
- statically, no moebench module assigns to a `forward` attribute, calls `setattr`, binds methods with
  `types.MethodType`, or imports a private name (`_foo`) from those libraries;
- at run time, after every variant transform (dense, MoE with a gated shared expert, RoE, ViMoE) and a
  training step and a cached generation, no library module carries a `forward` of its own in its
  instance dict, and none carries an attribute that the same class's instances in an untouched model
  (built by the library alone and run the same way) do not have. Replacing a child at a name the
  library gave it (a decoder layer's `mlp`, an entry of `layers`) is composition, not patching: the
  child names are checked to be the library's own.

A violation looks like: `Qwen2DecoderLayer at llm.model.layers.1: forward replaced` or
`Qwen2ForCausalLM at llm: attribute 'moebench_routed' is not the library's`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

PACKAGE = Path(__file__).resolve().parents[1] / "moebench"
LIBRARIES = ("transformers", "torch", "open_clip")


def _is_library(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] in LIBRARIES


def static_violations(root: Path = PACKAGE) -> list[str]:
    """`file:line: what` for every patching construct in the package's source."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Attribute) and sub.attr == "forward":
                            found.append(f"{where}: assigns to .forward")
            elif isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("setattr", "MethodType"):
                    found.append(f"{where}: calls {name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
                private = [a.name for a in node.names if a.name.startswith("_")]
                private += [part for part in node.module.split(".") if part.startswith("_")]
                if private:
                    found.append(f"{where}: imports private {', '.join(private)} from {node.module}")
    return found


def runtime_violations(model: nn.Module, reference: nn.Module) -> list[str]:
    """Library modules of `model` with a forward of their own, or an attribute or child name that no
    instance of their class in `reference` (the untouched library model, run the same way) has."""
    allowed: dict[type, set[str]] = {}
    children: dict[type, set[str]] = {}
    for m in reference.modules():
        if _is_library(m):
            allowed.setdefault(type(m), set()).update(vars(m))
            children.setdefault(type(m), set()).update(m._modules)
    found = []
    for name, m in model.named_modules():
        if not _is_library(m):
            continue
        label = f"{type(m).__name__} at {name or '<root>'}"
        if "forward" in vars(m):
            found.append(f"{label}: forward replaced")
        known = allowed.get(type(m))
        if known is None:
            continue  # a library class the reference does not build (e.g. a layer type inside our own module)
        found += [f"{label}: attribute {a!r} is not the library's" for a in sorted(set(vars(m)) - known)]
        found += [f"{label}: child {c!r} is not the library's" for c in sorted(set(m._modules) - children[type(m)])]
    return found


def test_no_patching_constructs_in_the_source():
    assert static_violations() == []


def test_the_static_check_sees_patching(tmp_path):
    pkg = tmp_path / "moebench"
    pkg.mkdir()
    (pkg / "bad.py").write_text("from transformers.utils import _private\n"
                                "def patch(layer, f):\n    layer.forward = f\n    setattr(layer, 'x', 1)\n")
    found = static_violations(pkg)
    assert len(found) == 3 and "assigns to .forward" in found[1] and "_private" in found[0]


@pytest.fixture(scope="module")
def tokenizer():
    from moebench.models.tokenizer import train_tokenizer

    texts = ["Is there a red circle in the image?", "USER: ASSISTANT: yes no left right", "a small blue star."] * 20
    return train_tokenizer(texts, 300)


def _vlm(tokenizer, family="qwen2"):
    from moebench.config import LLMConfig, ModelConfig, TokenizerConfig, VisionConfig
    from moebench.models.build import build_vlm

    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, layers=2, heads=2, intermediate_size=64),
        llm=LLMConfig(family=family, hidden_size=32, layers=4, heads=2, kv_heads=1, intermediate_size=64,
                      max_positions=128),
        tokenizer=TokenizerConfig(vocab_size=300))
    return build_vlm(cfg, tokenizer)


def _exercise(model, tokenizer):
    """A training step (forward + backward) and a batched cached generation."""
    from moebench.data.conversations import Encoder
    from moebench.eval.generate import greedy_generate

    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id)
    prompts = [enc.prompt(q) for q in ("Is there a star?", "What color is the small circle?")]
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([prompts[0], prompts[0]])
    model.train()
    model(ids, torch.ones_like(ids), pixels, labels=ids).logits.float().mean().backward()
    model.eval()
    greedy_generate(model, prompts, pixels, max_new_tokens=3, eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("family", ["qwen2", "llama", "stablelm", "phi"])
@pytest.mark.parametrize("variant", ["dense", "moe", "roe"])
def test_variants_leave_library_modules_as_the_library_made_them(tokenizer, variant, family):
    from moebench.config import MoEConfig, RoEConfig
    from moebench.moe.upcycle import upcycle
    from moebench.roe.model import add_roe

    reference = _vlm(tokenizer, family)
    _exercise(reference, tokenizer)
    model = _vlm(tokenizer, family)
    if variant == "moe":
        upcycle(model.llm, MoEConfig(num_experts=4, top_k=2, layers="all", shared_expert="gated"))
    elif variant == "roe":
        add_roe(model, RoEConfig(adapter_rank=8))
        model.roe.ctx.mode = "hard"
    _exercise(model, tokenizer)
    assert runtime_violations(model, reference) == []


def test_vision_moe_leaves_open_clip_modules_as_open_clip_made_them():
    from moebench.config import MoEConfig, ViTConfig
    from moebench.vision.vit import add_vision_moe, build_vit

    cfg = ViTConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    reference = build_vit(cfg)
    reference(x)
    vit = build_vit(cfg)
    add_vision_moe(vit, MoEConfig(num_experts=4, top_k=2, layers="all", shared_expert="gated"), "image")
    vit(x)[0].sum().backward()
    assert runtime_violations(vit, reference) == []


def test_the_runtime_check_sees_a_replaced_forward_and_a_foreign_attribute(tokenizer):
    reference, model = _vlm(tokenizer), _vlm(tokenizer)
    layer = model.llm.model.layers[1]
    layer.forward = lambda *a, **k: None
    model.llm.moebench_routed = []
    found = runtime_violations(model, reference)
    assert any("layers.1: forward replaced" in f for f in found)
    assert any("attribute 'moebench_routed'" in f for f in found)
