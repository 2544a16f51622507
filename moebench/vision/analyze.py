"""`moebench analyze routing RUN`: which classes each expert receives, per MoE layer.

For a vision MoE run: on the held-out set, M_l[c, e] counts the first-choice routings to expert e of
the tokens (or images, with image routing) of images of class c, at MoE layer l. Per layer:
  purity  = sum_e max_c M[c, e] / sum M     (1: every expert serves one class; 1/C: no specialisation)
  entropy = mean_c H(M[c, :] / sum_e M[c, e])   in nats (0: each class always goes to one expert)
Rows go to the metrics table (task "routing", split "layer<l>", the matrix in `extra`), and a PNG
heatmap shows each layer's row-normalised matrix (rows: classes, columns: experts; darker = more of
that class's routing). Layers whose rows are each one dark cell, different per class, have
specialised experts; uniform grey rows mean the layer routes without regard to class (a candidate to
stay dense). For an LLM MoE run the command prints the per-layer expert load from its eval rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moebench import results
from moebench.errors import UserError


def routing_matrices(model, data, batch_size: int = 128) -> dict[int, torch.Tensor]:
    """{layer: (classes, experts) counts of first-choice routings}; `data`: a classification split
    (moebench.vision.data.ClassLabels) whose classes label the images."""
    from moebench.vision.data import pixels
    from moebench.vision.vit import vision_moe_blocks

    blocks = vision_moe_blocks(model.vit)
    mats = {i: torch.zeros(len(data.classes), b.num_experts) for i, b in blocks}
    current = {}

    def hook(i):
        def fn(block, args, output) -> None:
            first = block.last.index[:, 0]  # (images,) with image routing, (images * tokens,) otherwise
            per_image = first.view(current["labels"].shape[0], -1)  # (B, units)
            for label, row in zip(current["labels"], per_image):
                mats[i][label] += torch.bincount(row, minlength=block.num_experts).float().cpu()
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in blocks]
    size = model.vit.image_size[0]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            idx = range(start, min(len(data), start + batch_size))
            current["labels"] = torch.stack([data.label(k) for k in idx])
            model(torch.stack([pixels(data.images[k], size) for k in idx]).to(device))
    for h in handles:
        h.remove()
    return mats


def purity_entropy(m: torch.Tensor) -> tuple[float, float]:
    total = m.sum()
    purity = float(m.max(0).values.sum() / total) if total > 0 else math.nan
    rows = m[m.sum(1) > 0]
    p = rows / rows.sum(1, keepdim=True)
    entropy = float(-(p * p.clamp(min=1e-12).log()).sum(1).mean()) if len(rows) else math.nan
    return purity, entropy


def heatmap_png(mats: dict[int, torch.Tensor], classes: list[str], path: Path, cell: int = 22) -> Path:
    """Row-normalised matrices side by side, one per layer (about `cell` pixels a cell), with a colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    experts = sum(m.shape[1] for m in mats.values())
    width, height = experts * cell + 30 * len(mats) + 170, max(len(classes) * cell, 160) + 90  # pixels
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")  # not pyplot's: none to close
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(mats), sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [m.shape[1] for m in mats.values()]})[0]
    for ax, (layer, m) in zip(axes, mats.items()):
        share = m / m.sum(1, keepdim=True).clamp(min=1)  # (classes, experts), each row sums to 1 (or is 0)
        image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set(title=f"layer {layer}", xlabel="expert", xticks=range(m.shape[1]))
    axes[0].set_yticks(range(len(classes)), classes)
    fig.colorbar(image, ax=axes, label="share of the class's routings", shrink=0.9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    return path


def analyze_vision_run(run_dir: Path, results_dir: Path, out_png: Path | None = None) -> dict:
    """Routing matrices of a vision run's MoE blocks on the val split of a classification task: the
    recipe's own, or the shapes world's classes (cls_shapes) for a segmentation recipe on the world."""
    from moebench.data.sources import resolve
    from moebench.eval.tasks import load_task
    from moebench.runs import open_run
    from moebench.vision.data import load_split
    from moebench.vision.vit import vision_moe_blocks

    run = open_run(run_dir)
    recipe = run.recipe
    model, _ = run.load_model()
    if not vision_moe_blocks(model.vit):
        raise UserError(f"{run_dir} has no MoE blocks (variant {recipe.variant}); analyze a vimoe run")
    tasks = [t for t in map(load_task, recipe.tasks) if t.head == "cls"]
    if not tasks and recipe.data.source == "shapes":
        tasks = [load_task("cls_shapes")]
    if not tasks:
        raise UserError(f"{run_dir}: its recipe has no classification task whose classes could label the images; "
                        "routing matrices need image classes")
    src = resolve(recipe.data.source, recipe.data.world, progress=False)
    val = load_split(tasks[0], src.root, tasks[0].splits[0])
    mats = routing_matrices(model, val)
    stamp, versions = results.utc_now(), results.software_versions()
    rows, summary = [], {}
    for layer, m in mats.items():
        purity, entropy = purity_entropy(m)
        summary[layer] = {"purity": purity, "entropy": entropy}
        for metric, value in (("purity", purity), ("entropy", entropy)):
            rows.append({"run": run.name, "variant": recipe.variant, "task": "routing", "split": f"layer{layer}",
                         "metric": metric, "value": value, "baseline": 1 / len(val.classes) if metric == "purity" else None,
                         "n": len(val), "dataset": src.name, "dataset_hash": src.hash, "recipe": recipe.name,
                         "extra": {"classes": val.classes, "matrix": m.tolist()}, "timestamp": stamp,
                         "git_commit": run.git_commit, **versions})
    results.append_rows(results_dir, "metrics", run.name, rows)
    png = heatmap_png(mats, val.classes, out_png or (results_dir / run.name / "routing.png"))
    return {"run": run.name, "layers": summary, "png": str(png)}


def llm_expert_load(run_name: str, results_dir: Path) -> dict:
    rows = [r for r in results.read_rows([results_dir], "metrics") if r["run"] == run_name and r.get("extra")]
    loads = {}
    for r in rows:
        extra = json.loads(r["extra"])
        if "expert_load" in extra:
            loads[r["task"]] = extra["expert_load"]
    if not loads:
        raise UserError(f"no expert load recorded for {run_name} in {results_dir}; evaluate an MoE run first")
    return loads
