"""A frozen tower's feature table (moebench/train/frozen.py) against the tower run image by image, and a
stage trained from the table against the same stage running the tower on every batch."""

from __future__ import annotations

import pytest
import torch

from moebench.train import frozen


def test_table_is_only_wanted_when_images_repeat_and_fit():
    assert frozen.wanted(6000, 31008, 16 * 128)  # the main job's stage II: 5.2 draws per image, 49 MB
    assert frozen.wanted(6000, 18000, 3 * 64 * 64)  # its stage 0 keeps pixels: 3 epochs, 295 MB
    assert not frozen.wanted(6000, 6000, 16 * 128)  # stage I: each image once
    assert not frozen.wanted(6000, 1568, 16 * 128)  # a short stage III
    assert not frozen.wanted(665_000, 10 * 665_000, 576 * 1024)  # LLaVA-665k at 336 px: 1.5 TB
    assert not frozen.wanted(0, 10, 16 * 128)


def test_table_equals_the_tower_image_by_image(tiny_recipe):
    from moebench.data.conversations import ConversationDataset, Encoder, collate, read_conversations
    from moebench.data.sources import resolve
    from moebench.models.build import build_vlm
    from moebench.train.pipeline import make_tokenizer

    torch.manual_seed(0)
    src = resolve(tiny_recipe.data.source, tiny_recipe.data.world, progress=False)
    tokenizer = make_tokenizer(tiny_recipe, src)
    model = build_vlm(tiny_recipe.model, tokenizer).train()
    stage = tiny_recipe.stage("finetune")
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id)
    items = read_conversations(src.root / stage.data)[:300]
    ds = ConversationDataset(items, src.root / stage.images, enc, stage.template, tiny_recipe.model.vision)
    fresh = ds.pixels(5)
    ds.memo = {}
    kept = ds.pixels(5)
    assert torch.equal(kept, fresh) and ds.pixels(5) is kept  # decoded once, then reused as is
    ds.memo = None
    table = frozen.feature_table(model, ds, torch.device("cpu"))
    assert model.training  # its mode is restored
    assert set(table) == {it["image"] for it in items}
    model.eval()
    with torch.no_grad():
        for i in (0, 7, 150, 299):
            alone = model.vision_features(ds.pixels(i)[None])[0]
            assert torch.allclose(table[items[i]["image"]], alone, atol=1e-5)
        plain = collate([ds[i] for i in range(8)], tokenizer.pad_token_id)
        ds.features = table
        cached = collate([ds[i] for i in range(8)], tokenizer.pad_token_id)
        assert "pixel_values" not in cached and cached["vision_features"].shape == (8, model.num_image_tokens, 32)
        a = model(plain["input_ids"], plain["attention_mask"], plain["pixel_values"]).logits
        b = model(cached["input_ids"], cached["attention_mask"], vision_features=cached["vision_features"]).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_stage_trained_from_the_table_matches_the_tower_every_batch(tiny_recipe, tmp_path, monkeypatch):
    """Only the tower's numerics differ (batched once against per batch): the losses agree to 1e-4."""
    from moebench.train.pipeline import train

    losses = {}
    for name, reuse in (("table", 0.0), ("tower", float("inf"))):
        monkeypatch.setattr(frozen, "MIN_REUSE", reuse)
        run = train(tiny_recipe, runs_dir=tmp_path / name, results_dir=tmp_path / f"{name}-results", progress=False)
        losses[name] = run.meta["final_loss"]
    assert abs(losses["table"] - losses["tower"]) < 1e-4

    # interrupted after stage II's step 3 (its checkpoint is at step 2), then resumed: the table is computed
    # again the same way, so the run ends exactly as the uninterrupted one
    monkeypatch.setattr(frozen, "MIN_REUSE", 0.0)

    class Stop(Exception):
        pass

    def stop_at_3(step: int) -> None:
        if step == 3 and stop_at_3.armed:
            stop_at_3.armed = False
            raise Stop

    stop_at_3.armed = True  # stages 0 and I have 2 steps each, so the stop lands in stage II
    kwargs = dict(runs_dir=tmp_path / "resumed", results_dir=tmp_path / "resumed-results", progress=False)
    with pytest.raises(Stop):
        train(tiny_recipe, on_step=stop_at_3, **kwargs)
    assert list((tmp_path / "resumed" / ".stages").glob("2-finetune-*/partial/state.pt"))  # resumes from step 2
    run = train(tiny_recipe, resume=True, **kwargs)
    assert run.meta["final_loss"] == losses["table"]
