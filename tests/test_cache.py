import os

import h5py
import numpy as np
import pytest

from conftest import overwrite, write_tone
from jaxtl import cache as cachelib
from jaxtl.audio import FeatureConfig
from jaxtl.cache import FeatureCache, cached_features


def features(paths, cfg, directory, **kw):
    return cached_features(paths, cfg, FeatureCache(directory, cfg), **kw)


def everything(cache: FeatureCache) -> dict:
    """Every clip a feature cache holds, read back."""
    return cache.read(list(cache.shards.index(refresh=True)))


@pytest.fixture
def clips(tmp_path):
    return [str(write_tone(tmp_path / "audio" / f"{i}.wav", seconds=0.2 + 0.05 * i, freq=300 + 40 * i))
            for i in range(5)]


def test_hit_after_miss_and_same_features(tmp_path, clips):
    cfg = FeatureConfig()
    first, _, (hits, misses) = features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    assert (hits, misses) == (0, 5)
    second, _, (hits, misses) = features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    assert (hits, misses) == (5, 0)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_second_run_does_no_audio_work(tmp_path, clips, monkeypatch):
    features(clips, FeatureConfig(), tmp_path / "c", workers=1, progress=False)

    def boom(*a, **k):
        raise AssertionError("audio was decoded on a warm cache")

    monkeypatch.setattr(cachelib, "extract", boom)
    features(clips, FeatureConfig(), tmp_path / "c", workers=1, progress=False)


def test_changed_setting_or_file_is_recomputed(tmp_path, clips):
    features(clips, FeatureConfig(), tmp_path / "c", workers=1, progress=False)
    _, _, (hits, misses) = features(clips, FeatureConfig(n_mfcc=20), tmp_path / "c", workers=1,
                                           progress=False)
    assert (hits, misses) == (0, 5)
    write_tone(clips[2], seconds=0.9, freq=1000)
    os.utime(clips[2], ns=(1, 1))  # a different mtime, even on coarse clocks
    feats, _, (hits, misses) = features(clips, FeatureConfig(), tmp_path / "c", workers=1,
                                               progress=False)
    assert (hits, misses) == (4, 1)
    assert feats[2].shape[-1] > feats[1].shape[-1]


def test_crash_mid_write_keeps_the_old_cache(tmp_path, clips, monkeypatch):
    cfg = FeatureConfig()
    features(clips[:3], cfg, tmp_path / "c", workers=1, progress=False)
    cache = FeatureCache(tmp_path / "c", cfg)
    before = everything(cache)
    assert len(before) == 3

    def crash(self):  # the new file's data is written, its `complete` mark and the rename are not
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(cachelib.h5py.File, "flush", crash)
    with pytest.raises(KeyboardInterrupt):
        features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    monkeypatch.undo()
    after = everything(cache)
    assert sorted(after) == sorted(before)
    assert not list((tmp_path / "c").rglob("*.tmp"))


def test_file_without_complete_mark_reads_as_empty(tmp_path, clips):
    cfg = FeatureConfig()
    features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    cache = FeatureCache(tmp_path / "c", cfg)
    (shard,) = cache.shards.files()
    with h5py.File(shard, "a") as f:
        del f.attrs["complete"]
    assert everything(cache) == {}
    shard.write_bytes(b"garbage")
    assert everything(cache) == {}
    _, _, (hits, misses) = features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    assert (hits, misses) == (0, 5)


def test_a_clip_overwritten_with_its_old_size_and_mtime_is_recomputed(tmp_path):
    """`cp -p` of another clip of the same length: size and mtime as before, content new."""
    import subprocess

    a = write_tone(tmp_path / "audio" / "a.wav", seconds=0.3, freq=300)
    b = write_tone(tmp_path / "audio" / "b.wav", seconds=0.3, freq=1200)
    os.utime(a, ns=(10**18, 10**18))
    os.utime(b, ns=(10**18, 10**18))
    cfg = FeatureConfig()
    (before,), _, _ = features([str(a)], cfg, tmp_path / "c", workers=1, progress=False)
    subprocess.run(["cp", "-p", str(b), str(a)], check=True)
    assert os.stat(a).st_size == os.stat(b).st_size and os.stat(a).st_mtime_ns == 10**18
    (after,), _, (hits, misses) = features([str(a)], cfg, tmp_path / "c", workers=1, progress=False)
    (want,), _, _ = cached_features([str(b)], cfg, None, workers=1, progress=False)
    assert (hits, misses) == (0, 1)
    np.testing.assert_array_equal(after, want)
    assert not np.array_equal(after, before)


def test_feature_code_and_library_versions_key_the_cache(monkeypatch):
    from jaxtl import audio

    key = FeatureConfig().key()
    monkeypatch.setattr(audio, "FEATURE_CODE_VERSION", audio.FEATURE_CODE_VERSION + 1)
    assert FeatureConfig().key() != key
    monkeypatch.undo()
    monkeypatch.setattr(audio, "_library_versions", lambda: {"librosa": "0.0.1"})
    assert FeatureConfig().key() != key


def test_runs_sharing_a_cache_keep_each_others_entries(tmp_path, clips):
    """Two runs that read the cache before either wrote: each appends a shard of what no shard holds then (the
    lock around that read-append is what keeps two writers at once from interleaving; not exercised here)."""
    cfg = FeatureConfig()
    first, second = FeatureCache(tmp_path / "c", cfg), FeatureCache(tmp_path / "c", cfg)
    feats, _ = cachelib.extract(clips, cfg, workers=1, progress=False)
    assert everything(first) == {} and everything(second) == {}
    first.add({"a": feats[0]})
    second.add({"b": feats[1]})
    assert sorted(everything(FeatureCache(tmp_path / "c", cfg))) == ["a", "b"]
    acts = {"taps": np.arange(6.0, dtype=np.float32).reshape(3, 2)}
    one, other = cachelib.ActivationCache(tmp_path / "c", "k"), cachelib.ActivationCache(tmp_path / "c", "k")
    one.add(["x", "y"], {"taps": acts["taps"][:2]})
    other.add(["y", "z"], {"taps": acts["taps"][1:]})
    found, stored = cachelib.ActivationCache(tmp_path / "c", "k").read(["x", "y", "z"])
    assert found.all() and len(one.shards.files()) == 2  # the second writer added z alone
    np.testing.assert_array_equal(stored["taps"], acts["taps"])


def test_appending_to_the_prefix_cache_rewrites_no_old_row_and_reads_only_the_rows_asked(tmp_path):
    rng = np.random.default_rng(0)
    acts = {"taps": rng.normal(size=(8, 4096)).astype(np.float32),  # 16 KB a row: data, not HDF5's overhead
            "h": rng.normal(size=(8, 2, 2, 4)).astype(cachelib.ml_bfloat16()),
            "none": np.zeros((8, 0), np.float32)}  # no tapped block before the split point yet
    keys = [f"clip{i}" for i in range(8)]
    empty = cachelib.ActivationCache(tmp_path, "empty")  # h5py selects 16+ rows of an (N, 0) array as a hyperslab
    empty.add([f"e{i}" for i in range(20)], {"none": np.zeros((20, 0), np.float32)})
    assert empty.read([f"e{i}" for i in range(20)])[1]["none"].shape == (20, 0)
    store = cachelib.ActivationCache(tmp_path, "k")
    store.add(keys[:5], {n: a[:5] for n, a in acts.items()})
    (first,) = store.shards.files()
    before = first.read_bytes()
    store.add(keys[3:], {n: a[3:] for n, a in acts.items()})  # 2 clips it has, 3 new ones
    shards = store.shards.files()
    assert shards[0] == first and first.read_bytes() == before  # old rows byte-identical, the file untouched
    with h5py.File(shards[1], "r") as f:
        assert [k.decode() for k in f["keys"][:]] == keys[5:] and len(f["acts/taps"]) == 3  # the new rows only
    assert shards[1].stat().st_size < 0.7 * first.stat().st_size  # grew by 3 rows' bytes, not by a rewrite of 8
    found, rows = store.read(["clip6", "unknown", "clip1"])
    assert found.tolist() == [True, False, True] and rows["h"].dtype == acts["h"].dtype
    for name, a in acts.items():
        np.testing.assert_array_equal(rows[name][[0, 2]], a[[6, 1]])
        assert not np.asarray(rows[name][1], np.float32).any()
    found, rows = store.read(keys)  # every row: a contiguous run of each shard, empty arrays included
    assert found.all() and rows["none"].shape == (8, 0)
    np.testing.assert_array_equal(rows["taps"], acts["taps"])
    with h5py.File(shards[1], "r+") as f:  # a shard whose write never completed reads as absent
        del f.attrs["complete"]
    assert cachelib.ActivationCache(tmp_path, "k").read(["clip6", "clip1"])[0].tolist() == [False, True]


def test_a_jaxtl_0_2_prefix_cache_file_is_read_as_the_first_shard(tmp_path):
    with h5py.File(tmp_path / "prefix-k.h5", "w") as f:  # the single file jaxtl 0.2 wrote
        f["keys"] = np.array([b"a", b"b"])
        f["acts/taps"] = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
        f["acts/taps"].attrs["bfloat16"] = False
        f.attrs["complete"] = True
    store = cachelib.ActivationCache(tmp_path, "k")
    found, rows = store.read(["b", "c"])
    assert found.tolist() == [True, False] and rows["taps"][0].tolist() == [3.0, 4.0]
    store.add(["b", "c"], {"taps": np.array([[3.0, 4.0], [5.0, 6.0]], np.float32)})
    assert store.read(["a", "b", "c"])[0].all() and len(store.shards.files()) == 2


def test_the_feature_cache_appends_new_clips_as_a_shard_and_reads_only_the_clips_asked(tmp_path, clips):
    cfg = FeatureConfig()
    features(clips[:3], cfg, tmp_path / "c", workers=1, progress=False)
    cache = FeatureCache(tmp_path / "c", cfg)
    (first,) = cache.shards.files()
    before = first.read_bytes()
    feats, _, (hits, misses) = features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    assert (hits, misses) == (3, 2)
    shards = cache.shards.files()
    assert shards[0] == first and first.read_bytes() == before  # the old clips' file untouched
    with h5py.File(shards[1], "r") as f:
        assert len(f["keys"]) == 2  # the two new clips only
    keys = [cachelib.file_key(p) for p in clips]
    with h5py.File(first, "r") as f:  # rows 0 and 2 of the first shard: two runs of rows, read apart
        apart = [k.decode() for k in f["keys"][[0, 2]]]
    asked = [keys[4], "unknown", *apart]
    got = FeatureCache(tmp_path / "c", cfg).read(asked)
    assert sorted(got) == sorted([keys[4], *apart])
    for k in (keys[4], *apart):
        np.testing.assert_array_equal(got[k], feats[keys.index(k)])


@pytest.mark.parametrize("byte", [0x3F, 0xFF], ids=["finite-garbage", "nan"])
def test_damaged_bytes_in_a_feature_shard_are_named_set_aside_and_recomputed(tmp_path, clips, caplog, byte):
    cfg = FeatureConfig()
    clean, _, _ = features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    (shard,) = FeatureCache(tmp_path / "c", cfg).shards.files()
    overwrite(shard, "flat", byte)
    again, _, (hits, misses) = features(clips, cfg, tmp_path / "c", workers=1, progress=False)
    assert (hits, misses) == (0, 5)  # every clip of the damaged shard computed again, none read from it
    for a, b in zip(again, clean):
        np.testing.assert_array_equal(a, b)
    (warning,) = [r.getMessage() for r in caplog.records if "damaged cache shard" in r.getMessage()]
    assert str(shard) in warning and "computed again" in warning
    assert shard.with_name(shard.name + ".damaged").is_file()  # set aside, for a look
    assert features(clips, cfg, tmp_path / "c", workers=1, progress=False)[2] == (5, 0)  # the new shard serves


def test_damaged_prefix_rows_are_set_aside_whether_checksummed_or_written_before_checksums(tmp_path, caplog):
    rows = np.random.default_rng(0).normal(size=(6, 2048)).astype(np.float32)
    store = cachelib.ActivationCache(tmp_path, "k")
    store.add([f"c{i}" for i in range(3)], {"taps": rows[:3]})
    store.add([f"c{i}" for i in range(3, 6)], {"taps": rows[3:]})
    first, second = store.shards.files()
    overwrite(first, "acts/taps", 0x3F)  # finite garbage: only the checksum can tell
    with h5py.File(second, "r+") as f:  # as jaxtl 0.4 wrote it: no checksums, then NaN bytes
        del f["acts/taps"], f["crc32"]
        f["acts/taps"] = np.where(np.arange(3)[:, None] == 1, np.nan, rows[3:])
        f["acts/taps"].attrs["bfloat16"] = False
    found, got = cachelib.ActivationCache(tmp_path, "k").read([f"c{i}" for i in range(6)])
    assert not found.any() and got is None
    warnings = [r.getMessage() for r in caplog.records if "damaged cache shard" in r.getMessage()]
    assert len(warnings) == 2 and str(first) in warnings[0] and "non-finite" in warnings[1]
    store = cachelib.ActivationCache(tmp_path, "k")
    store.add([f"c{i}" for i in range(6)], {"taps": rows})  # computed again, into a shard of their own
    found, got = store.read([f"c{i}" for i in range(6)])
    assert found.all() and np.array_equal(got["taps"], rows)


def test_a_cache_that_cannot_be_written_warns_once_and_the_work_goes_on(tmp_path, clips, caplog, monkeypatch):
    import errno

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.File, "flush", full)  # the fault at the write call
    cache = FeatureCache(tmp_path / "c", FeatureConfig())
    feats, errors, (hits, misses) = cached_features(clips[:3], FeatureConfig(), cache, workers=1, progress=False)
    assert len([f for f in feats if f is not None]) == 3 and not errors and misses == 3
    cached_features(clips[3:], FeatureConfig(), cache, workers=1, progress=False)
    (warning,) = [r.getMessage() for r in caplog.records if "cache" in r.getMessage()]
    assert warning.startswith(f"warning: {cache.shards.path}: cannot write the cache: No space left on device (")
    assert warning.endswith(" free there); going on without caching")
    assert [p.name for p in (tmp_path / "c").rglob("*") if not p.name.endswith(".lock") and p.is_file()] == []


def test_a_shard_unreadable_for_a_system_reason_stays_and_a_set_aside_shards_number_is_not_reused(tmp_path, caplog,
                                                                                                 monkeypatch):
    import errno

    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    store = cachelib.ActivationCache(tmp_path, "k")
    store.add(["a", "b"], {"taps": rows})
    (shard,) = store.shards.files()
    real = h5py.File

    def failing(path, *a, **k):  # an I/O error of the system, not of the bytes
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(h5py, "File", failing)
    assert not cachelib.ActivationCache(tmp_path, "k").read(["a"])[0].any()
    monkeypatch.setattr(h5py, "File", real)
    assert shard.is_file() and "cannot read the cache shard (Input/output error)" in caplog.text
    overwrite(shard, "acts/taps", 0x3F)
    store = cachelib.ActivationCache(tmp_path, "k")
    assert not store.read(["a", "b"])[0].any()  # damaged: set aside
    store.add(["a", "b"], {"taps": rows})
    assert [p.name for p in sorted(shard.parent.glob("rows-*"))] == ["rows-000000.h5.damaged", "rows-000001.h5"]
