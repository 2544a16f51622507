"""Report plots and the routing heatmap: the Pareto front by hand, and PNGs that decode, have a sensible
size, change with the data and are byte-identical when redrawn."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from moebench.plots import pareto, report_plots
from moebench.vision.analyze import heatmap_png


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and "Software" not in im.info  # no version stamp: same input, same bytes
        return np.asarray(im.convert("RGB")).astype(int)


def test_pareto_front_hand_worked():
    # (cost, value). a: cheapest; b: dearer and better than a; c: dearer than b, same value (dominated);
    # d: dearest and best; e: a copy of b (neither beats the other, both stay); f: dearer and worse than d
    points = [(1.0, 0.3), (2.0, 0.5), (3.0, 0.5), (4.0, 0.7), (2.0, 0.5), (5.0, 0.6)]
    assert pareto(points) == [0, 1, 4, 3]  # sorted by cost, so the line runs left to right
    assert pareto([(1.0, 0.9), (2.0, 0.1)]) == [0]  # cheaper and better: the front is one point
    assert pareto([(3.0, 0.2)]) == [0]


def test_report_plots_pngs(tmp_path):
    def row(run, variant, value, params, sps):
        return {"run": run, "variant": variant, "task": "gqa", "metric": "exact_match", "value": value,
                "params_activated": params, "samples_per_s": sps}

    rows = [row("shapes_dense-5b29c69c", "dense", 0.54, 1968896, 504.6),
            row("shapes_moe-e00fc7c4", "moe", 0.522, 2363136, 424.2),
            row("shapes_roe-f91404ec", "roe", 0.547, 1849949, 637.7),
            row("shapes_stgc-3addc7db", "stgc", 0.522, 2363136, None),  # at moe's point; no latency
            {**row("shapes_dense-5b29c69c", None, 0.9, None, 300.0), "task": "pope", "metric": "f1"}]
    paths = report_plots(rows, tmp_path / "a")
    assert [p.name for p in paths] == ["gqa-exact_match-vs-params.png", "gqa-exact_match-vs-latency.png",
                                       "pope-f1-vs-latency.png"]  # no params on the pope row: no params plot
    for p in paths:
        px = _pixels(p)
        assert 300 <= px.shape[1] <= 2000 and 200 <= px.shape[0] <= 2000 and (px < 128).any()  # drawn on
    again = report_plots(rows, tmp_path / "b")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    moved = report_plots([{**rows[0], "value": 0.2}, *rows[1:]], tmp_path / "c")
    assert moved[0].read_bytes() != paths[0].read_bytes()  # the data, not just the frame, is drawn


def test_heatmap_png(tmp_path):
    mats = {2: torch.tensor([[9.0, 1, 0, 0], [0, 0, 6, 0], [0, 0, 0, 0]]),  # a class with no routings: a white row
            3: torch.tensor([[1.0, 1, 1, 1], [0, 4, 0, 0], [2, 0, 0, 2]])}
    classes = ["bar", "circle", "a much longer class name"]
    path = heatmap_png(mats, classes, tmp_path / "run" / "routing.png")
    px = _pixels(path)
    assert 200 <= px.shape[1] <= 2000 and 150 <= px.shape[0] <= 2000
    dark_blue = (px[..., 2] > px[..., 0] + 100) & (px[..., 0] < 60)  # cells near share 1, and the colour bar's top
    assert dark_blue.sum() > 500
    assert heatmap_png(mats, classes, tmp_path / "again.png").read_bytes() == path.read_bytes()
    wider = heatmap_png({**mats, 5: mats[2]}, classes, tmp_path / "three.png")
    assert _pixels(wider).shape[1] > px.shape[1]  # one panel per layer
