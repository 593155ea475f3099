"""Adapter pooling, composition of visual tokens with text, checkpoints and training controls."""

import json

import pytest
import torch

from mmalign.adapters.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mmalign.adapters.base import select_vision_tokens
from mmalign.adapters.compose import IGNORE_INDEX, build_prompt, compose
from mmalign.adapters.linear import LinearAdapter, LinearPrefixAdapter
from mmalign.adapters.mlp import MLPAdapter
from mmalign.adapters.registry import build_adapter
from mmalign.adapters.train import batch_rows, shuffled_pairing


def _linear(d_vision, d_lm, pooled_grid=2, keep_cls=True):
    return LinearAdapter(d_vision, d_lm, pooled_grid=pooled_grid, keep_cls=keep_cls, has_cls_token=True, n_encoder_tokens=17)


def test_pooling_averages_patch_blocks():
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # 4x4 grid, one channel
    cls = torch.full((1, 1, 1), -1.0)
    pooled = select_vision_tokens(torch.cat([cls, grid], dim=1), has_cls_token=True, keep_cls=True, pooled_grid=2)
    assert pooled.shape == (1, 5, 1)
    assert pooled[0, 0, 0] == -1.0
    # top-left 2x2 block holds 0, 1, 4, 5
    assert pooled[0, 1, 0] == pytest.approx(2.5)
    assert pooled[0, 4, 0] == pytest.approx((10 + 11 + 14 + 15) / 4)


def test_pooling_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square grid"):
        select_vision_tokens(torch.zeros(1, 1 + 15, 3), has_cls_token=True, keep_cls=True, pooled_grid=2)


def test_pooling_rejects_cls_from_encoder_without_one():
    with pytest.raises(ValueError, match="keep_cls"):
        select_vision_tokens(torch.zeros(1, 16, 3), has_cls_token=False, keep_cls=True, pooled_grid=2)


def test_adapter_rejects_wrong_vision_dimension():
    adapter = _linear(8, 4, pooled_grid=1, keep_cls=False)
    with pytest.raises(ValueError, match="dimension 6"):
        adapter(torch.zeros(1, 5, 6))


def test_shuffled_pairing_has_no_fixed_point():
    for n in (2, 3, 10, 50):
        order = shuffled_pairing(n, seed=n)
        assert sorted(order.tolist()) == list(range(n))
        assert not (order == torch.arange(n)).any()


def test_compose_layout_and_masks(smollm2):
    visual = torch.randn(2, 3, smollm2.d_model)
    batch = compose(smollm2, ["A cat.", "A red double-decker bus."], build_prompt(smollm2, "plain", "A picture of"), 32, visual)
    lengths = batch.attention_mask.sum(dim=1)
    assert batch.inputs_embeds.shape[:2] == batch.labels.shape
    assert batch.image_mask[:, 1:4].all() and batch.image_mask.sum() == 6
    assert torch.equal(batch.inputs_embeds[:, 1:4], visual)
    for row in range(2):
        labelled = (batch.labels[row] != IGNORE_INDEX).nonzero().flatten()
        caption = batch.caption_mask[row].nonzero().flatten()
        # the loss covers the caption and the end token, never padding or the prefix
        assert labelled.tolist() == caption.tolist() + [int(lengths[row]) - 1]
        assert not batch.caption_mask[row, : 4].any()


def test_compose_text_only_has_no_image_positions(smollm2):
    batch = compose(smollm2, ["A cat."], build_prompt(smollm2), 32, visual_tokens=None)
    assert not batch.image_mask.any()
    assert batch.caption_mask[0, 0] == False  # the start token is in no group  # noqa: E712


def test_compose_truncates_long_captions(smollm2):
    batch = compose(smollm2, ["word " * 200], build_prompt(smollm2), 8, visual_tokens=None)
    assert int(batch.caption_mask.sum()) == 7


def _metadata():
    return {
        "vision_encoder": {"encoder_id": "bundled:dinov2-small", "d_model": 8},
        "lm": {"lm_id": "bundled:smollm2-135m", "d_model": 4},
        "step": 3,
    }


def test_checkpoint_round_trip(tmp_path):
    adapter = _linear(8, 4)
    save_checkpoint(adapter, tmp_path / "final", _metadata())
    loaded, config = load_checkpoint(tmp_path / "final", {"encoder_id": "bundled:dinov2-small", "d_model": 8}, {"lm_id": "bundled:smollm2-135m", "d_model": 4})
    assert torch.equal(loaded.proj.weight, adapter.proj.weight)
    assert config["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp directory left


def test_checkpoint_for_other_lm_names_both(tmp_path):
    save_checkpoint(_linear(8, 4), tmp_path / "c", _metadata())
    with pytest.raises(CheckpointError, match="bundled:smollm2-135m.*hf:other"):
        load_checkpoint(tmp_path / "c", expect_lm={"lm_id": "hf:other", "d_model": 4})


def test_checkpoint_for_other_encoder_names_both(tmp_path):
    save_checkpoint(_linear(8, 4), tmp_path / "c", _metadata())
    with pytest.raises(CheckpointError, match="dinov2-small.*d=8.*d=1024"):
        load_checkpoint(tmp_path / "c", expect_vision={"encoder_id": "open_clip:ViT-L-14@openai", "d_model": 1024})


def test_checkpoint_missing_weights(tmp_path):
    save_checkpoint(_linear(8, 4), tmp_path / "c", _metadata())
    (tmp_path / "c" / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing adapter.safetensors"):
        load_checkpoint(tmp_path / "c")


def test_checkpoint_invalid_config(tmp_path):
    save_checkpoint(_linear(8, 4), tmp_path / "c", _metadata())
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps({"adapter": {"kind": "mystery"}}))
    with pytest.raises(CheckpointError, match="invalid adapter_config.json"):
        load_checkpoint(tmp_path / "c")


def test_adapter_kinds_output_shapes():
    tokens = torch.randn(2, 17, 8)  # CLS + 4x4 grid
    common = {"pooled_grid": 2, "keep_cls": True, "has_cls_token": True, "n_encoder_tokens": 17}
    assert LinearAdapter(8, 6, **common)(tokens).shape == (2, 5, 6)
    assert LinearPrefixAdapter(8, 6, prefix_tokens=3, **common)(tokens).shape == (2, 3, 6)
    assert MLPAdapter(8, 6, hidden_dim=10, **common)(tokens).shape == (2, 5, 6)
    assert LinearAdapter(8, 6, **{**common, "pooled_grid": None, "keep_cls": False})(tokens).shape == (2, 16, 6)


def test_build_adapter_round_trips_shape():
    for adapter in (
        LinearPrefixAdapter(8, 6, prefix_tokens=3, pooled_grid=None, keep_cls=False, has_cls_token=True, n_encoder_tokens=17),
        MLPAdapter(8, 6, hidden_dim=10, pooled_grid=2, keep_cls=True, has_cls_token=True, n_encoder_tokens=17, dropout=0.1),
    ):
        rebuilt = build_adapter(adapter.shape_config())
        assert rebuilt.shape_config() == adapter.shape_config()


def test_build_adapter_unknown_kind():
    with pytest.raises(ValueError, match="accepted kinds: linear, linear-prefix, mlp"):
        build_adapter({"kind": "qformer", "d_vision": 8, "d_lm": 4})


def test_dropout_only_in_training_mode():
    adapter = LinearAdapter(8, 6, pooled_grid=None, keep_cls=False, has_cls_token=True, n_encoder_tokens=17, dropout=0.5)
    tokens = torch.randn(1, 17, 8)
    adapter.eval()
    assert torch.equal(adapter(tokens), adapter(tokens))
    adapter.train()
    assert not torch.equal(adapter(tokens), adapter(tokens))


def test_batch_rows_cover_each_epoch_once():
    rows = torch.cat([batch_rows(step, 10, 3, seed=1) for step in (1, 2, 3)])
    assert len(set(rows.tolist())) == 9
    assert torch.equal(batch_rows(2, 10, 3, seed=1), batch_rows(2, 10, 3, seed=1))
    with pytest.raises(ValueError, match="larger than"):
        batch_rows(1, 2, 3, seed=0)


def test_chat_prompt_puts_image_in_user_turn(smollm2):
    prompt = build_prompt(smollm2, "chat", instruction="Describe the image.")
    before = smollm2.tokenizer.decode(list(prompt.before_image))
    after = smollm2.tokenizer.decode(list(prompt.after_image))
    assert before.endswith("user\n")
    assert "Describe the image." in after
    assert after.rstrip().endswith("assistant")
    visual = torch.randn(1, 2, smollm2.d_model)
    batch = compose(smollm2, ["A cat."], prompt, 16, visual)
    first_visual = len(prompt.before_image)
    assert batch.image_mask[0, first_visual : first_visual + 2].all()


def test_unknown_prompt_style(smollm2):
    with pytest.raises(ValueError, match="plain, chat"):
        build_prompt(smollm2, "socratic")
