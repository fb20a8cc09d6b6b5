"""Random inputs (wpk.feeds, and the optimizer's sample inputs): masks are fed as masks."""
from __future__ import annotations

import numpy as np

from wpk.feeds import is_mask, padded_mask, random_feeds
from wpk.optimizer.accuracy import sample_inputs
from wpk.tensor_spec import TensorSpec


def test_masks_are_all_ones_and_other_integers_stay_random():
    specs = {"input_ids": ((1, 64), np.int64), "attention_mask": ((1, 64), np.int64),
             "pixel_mask": ((1, 8), np.bool_), "image": ((1, 3), np.float32)}
    feeds = random_feeds(specs, seed=0, integer_values=2)
    assert feeds["attention_mask"].dtype == np.int64 and (feeds["attention_mask"] == 1).all()
    assert feeds["pixel_mask"].all()
    assert set(np.unique(feeds["input_ids"])) == {0, 1}
    assert feeds["image"].dtype == np.float32
    assert not is_mask("mask", np.float32) and is_mask("Input_Mask", np.int32)


def test_the_optimizer_times_transformers_on_whole_masks_not_random_integers():
    inputs = [TensorSpec("input_ids", (1, 128), "int64"),
              TensorSpec("attention_mask", (1, 128), "int64")]
    feeds = sample_inputs(inputs, count=4, seed=1)
    assert (feeds[0]["attention_mask"] == 1).all()          # the feed candidates are timed on
    kept = [int(f["attention_mask"].sum()) for f in feeds]   # the guard also sees padding
    assert kept == [128, 96, 64, 32]
    assert all(f["attention_mask"][0, :k].all() and not f["attention_mask"][0, k:].any()
               for f, k in zip(feeds, kept))
    assert all(f["input_ids"].max() > 1 for f in feeds)


def test_a_padded_mask_keeps_at_least_one_position():
    assert padded_mask((1, 1), np.int64, 3).tolist() == [[1]]
    assert padded_mask((2, 4), np.int32, 5).tolist() == [[1, 0, 0, 0]] * 2
