import os

import h5py
import numpy as np
import pytest

from conftest import write_tone
from jaxtl import cache as cachelib
from jaxtl.audio import FeatureConfig
from jaxtl.cache import FeatureCache, cached_features


@pytest.fixture
def clips(tmp_path):
    return [str(write_tone(tmp_path / "audio" / f"{i}.wav", seconds=0.2 + 0.05 * i, freq=300 + 40 * i))
            for i in range(5)]


def test_hit_after_miss_and_same_features(tmp_path, clips):
    cfg = FeatureConfig()
    first, _, (hits, misses) = cached_features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    assert (hits, misses) == (0, 5)
    second, _, (hits, misses) = cached_features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    assert (hits, misses) == (5, 0)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_second_run_does_no_audio_work(tmp_path, clips, monkeypatch):
    cached_features(clips, FeatureConfig(), tmp_path / "c", workers=1, progress=False)

    def boom(*a, **k):
        raise AssertionError("audio was decoded on a warm cache")

    monkeypatch.setattr(cachelib, "extract", boom)
    cached_features(clips, FeatureConfig(), tmp_path / "c", workers=1, progress=False)


def test_changed_setting_or_file_is_recomputed(tmp_path, clips):
    cached_features(clips, FeatureConfig(), tmp_path / "c", workers=1, progress=False)
    _, _, (hits, misses) = cached_features(clips, FeatureConfig(n_mfcc=20), tmp_path / "c", workers=1,
                                           progress=False)
    assert (hits, misses) == (0, 5)
    write_tone(clips[2], seconds=0.9, freq=1000)
    os.utime(clips[2], ns=(1, 1))  # a different mtime, even on coarse clocks
    feats, _, (hits, misses) = cached_features(clips, FeatureConfig(), tmp_path / "c", workers=1,
                                               progress=False)
    assert (hits, misses) == (4, 1)
    assert feats[2].shape[-1] > feats[1].shape[-1]


def test_crash_mid_write_keeps_the_old_cache(tmp_path, clips, monkeypatch):
    cfg = FeatureConfig()
    cached_features(clips[:3], cfg, tmp_path / "c", workers=1, progress=False)
    cache = FeatureCache(tmp_path / "c", cfg)
    before = cache.load()

    real_concatenate = np.concatenate

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(cachelib.np, "concatenate", crash)
    with pytest.raises(KeyboardInterrupt):
        cached_features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    monkeypatch.setattr(cachelib.np, "concatenate", real_concatenate)
    after = cache.load()
    assert sorted(after) == sorted(before)
    assert not list((tmp_path / "c").glob("*.tmp"))


def test_file_without_complete_mark_reads_as_empty(tmp_path, clips):
    cfg = FeatureConfig()
    cached_features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    cache = FeatureCache(tmp_path / "c", cfg)
    with h5py.File(cache.path, "a") as f:
        del f.attrs["complete"]
    assert cache.load() == {}
    cache.path.write_bytes(b"garbage")
    assert cache.load() == {}
    _, _, (hits, misses) = cached_features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    assert (hits, misses) == (0, 5)
