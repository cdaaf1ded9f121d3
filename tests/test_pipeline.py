import dataclasses

import numpy as np

from conftest import all_features, quiet
from jaxtl.pipeline import prepare


def test_augmentation_copies_extend_only_the_training_split(cfg):
    plain = prepare(cfg.data_spec(), log=quiet)
    aug = prepare(dataclasses.replace(cfg, augment_copies=2).data_spec(), log=quiet)
    n = len(plain.y)
    assert len(aug.y) == n + 2 * len(plain.train) and aug.n_files == plain.n_files == n
    np.testing.assert_array_equal(aug.val, plain.val)
    np.testing.assert_array_equal(aug.test, plain.test)
    assert set(aug.train[len(plain.train):]) == set(range(n, len(aug.y)))
    assert len(set(aug.keys)) == len(aug.keys)  # every copy has its own identity
    first_copy = n
    source = plain.train[0]
    assert aug.paths[first_copy] == plain.paths[source] and aug.y[first_copy] == plain.y[source]
    assert not np.array_equal(all_features(aug).clip(first_copy), all_features(plain).clip(source))


def test_vtlp_copies_warp_the_mel_axis_of_the_pitch_tempo_copies(cfg):
    base = dataclasses.replace(cfg, representation="logmel", augment_copies=1, time_stretch=0.0, pitch_shift=0.0)
    plain = prepare(base.data_spec(), log=quiet)
    warped = prepare(dataclasses.replace(base, vtlp=0.2).data_spec(), log=quiet)
    copy, source = plain.n_files, plain.train[0]
    assert warped.keys[copy] != plain.keys[copy]  # the warp is part of a copy's identity (and cache key)
    plain_feats = all_features(plain)
    np.testing.assert_allclose(plain_feats.clip(copy), plain_feats.clip(source), atol=1e-4)  # no warp: the clip
    assert not np.allclose(all_features(warped).clip(copy), plain_feats.clip(source), atol=1e-2)
