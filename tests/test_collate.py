"""Padded and padding-free collation by hand; bin packing as properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.train.collate import collate_flat, collate_padded, pack_bins, packing_efficiency
from finetune.train.losses import count_trained_tokens

SAMPLES = [
    {"input_ids": [11, 12, 13], "labels": [11, 12, 13]},
    {"input_ids": [21], "labels": [21]},
    {"input_ids": [31, 32], "labels": [-100, 32]},
]


def test_collate_padded_by_hand():
    b = collate_padded(SAMPLES, pad_id=0)
    assert b.input_ids.tolist() == [[11, 12, 13], [21, 0, 0], [31, 32, 0]]
    # first label of each sample masked (it is never a target), padding masked
    assert b.labels.tolist() == [[-100, 12, 13], [-100, -100, -100], [-100, 32, -100]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2]] * 3
    assert b.seq_lens == [3, 1, 2] and b.num_samples == 3 and b.num_tokens == 6
    assert b.num_trained_tokens == 3 and not b.is_flat
    assert collate_padded(SAMPLES, pad_id=0, pad_to_multiple_of=4).input_ids.shape == (3, 4)
    inputs = b.model_inputs()
    assert set(inputs) == {"input_ids", "position_ids", "attention_mask", "use_cache"}


def test_collate_flat_by_hand():
    b = collate_flat(SAMPLES)
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 31, 32]]
    assert b.labels.tolist() == [[-100, 12, 13, -100, -100, 32]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert b.cu_seq_lens.tolist() == [0, 3, 4, 6] and b.cu_seq_lens.dtype == torch.int32
    assert b.max_seq_len == 3 and b.attention_mask is None and b.is_flat
    inputs = b.model_inputs()
    assert "labels" not in inputs and "attention_mask" not in inputs and inputs["use_cache"] is False
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"] is b.cu_seq_lens
    assert inputs["max_length_q"] == inputs["max_length_k"] == 3


def test_batch_to_moves_every_tensor():
    moved = collate_flat(SAMPLES).to("meta")
    assert {moved.input_ids.device.type, moved.labels.device.type, moved.position_ids.device.type,
            moved.cu_seq_lens.device.type} == {"meta"}
    assert moved.seq_lens == [3, 1, 2] and moved.max_seq_len == 3


def test_collate_rejects_bad_samples():
    with pytest.raises(ValueError):
        collate_flat([])
    with pytest.raises(ValueError, match="sample 1"):
        collate_padded([SAMPLES[0], {"input_ids": [1, 2], "labels": [1]}], pad_id=0)


sample_lists = st.lists(
    st.lists(st.tuples(st.integers(0, 50), st.booleans()), min_size=1, max_size=12),
    min_size=1, max_size=6,
).map(lambda rows: [{"input_ids": [t for t, _ in r], "labels": [t if keep else -100 for t, keep in r]}
                    for r in rows])


@settings(max_examples=60, deadline=None)
@given(sample_lists)
def test_flat_and_padded_agree_on_trained_tokens(samples):
    flat, padded = collate_flat(samples), collate_padded(samples, pad_id=0)
    alone = sum(count_trained_tokens(collate_flat([s]).labels) for s in samples)
    assert flat.num_trained_tokens == padded.num_trained_tokens == alone
    assert flat.labels[0][flat.cu_seq_lens[:-1].long()].eq(-100).all()


def test_pack_bins_best_fit_decreasing_by_hand():
    lengths = [5, 3, 5, 7, 8, 2]  # in this order, next-fit would need 4 bins
    bins = pack_bins(lengths, 10)
    # 8 opens bin 0, 7 bin 1, 5 bin 2, 5 fills bin 2, 3 fills bin 1 exactly, 2 fills bin 0 exactly
    assert bins == [[4, 5], [3, 1], [0, 2]]
    assert packing_efficiency(bins, lengths, 10) == 1.0
    assert packing_efficiency([[0], [1]], [5, 5], 10) == 0.5
    with pytest.raises(ValueError, match="sample 1"):
        pack_bins([3, 11], 10)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(
    lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=40))))
def test_pack_bins_properties(case):
    cap, lengths = case
    bins = pack_bins(lengths, cap)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each index once
    levels = [sum(lengths[i] for i in b) for b in bins]
    assert all(level <= cap for level in levels)
    # Any-fit property: a bin is opened only when the item fits no earlier bin, so any two bins
    # together overflow one (hence at most one bin is half empty or worse).
    assert all(levels[i] + levels[j] > cap for i in range(len(bins)) for j in range(i + 1, len(bins)))
    assert pack_bins(lengths, cap) == bins  # deterministic
