import librosa
import numpy as np
import pytest
import soundfile as sf

from conftest import write_tone
from jaxtl.audio import BadAudio, FeatureConfig, extract, features_batch, file_features, load_audio


def _clips(n=7, sr=22050, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.1, int(sr * s)).astype(np.float32) for s in rng.uniform(0.05, 1.5, n)]


def test_batched_mfcc_equals_per_clip_librosa():
    cfg = FeatureConfig()
    clips = _clips()
    for clip, feat in zip(clips, features_batch(clips, cfg)):
        ref = librosa.feature.mfcc(y=clip, sr=cfg.sample_rate, n_mfcc=13)
        assert feat.shape == (1,) + ref.shape
        np.testing.assert_allclose(feat[0], ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())


def test_batched_logmel_equals_per_clip_librosa():
    cfg = FeatureConfig(representation="logmel", n_mels=64, fmax=8000)
    clips = _clips(seed=1)
    for clip, feat in zip(clips, features_batch(clips, cfg)):
        mel = librosa.feature.melspectrogram(y=clip, sr=cfg.sample_rate, n_mels=64, fmax=8000)
        ref = librosa.power_to_db(mel, ref=np.max)
        np.testing.assert_allclose(feat[0], ref, rtol=1e-4, atol=1e-3)


def test_batched_pcen_equals_per_clip_librosa():
    cfg = FeatureConfig(representation="pcen", sample_rate=8000, n_fft=512, win_length=256, hop_length=64, fmax=4000)
    clips = _clips(sr=8000, seed=3)
    for clip, feat in zip(clips, features_batch(clips, cfg)):
        mel = librosa.feature.melspectrogram(y=clip, sr=8000, n_fft=512, win_length=256, hop_length=64, fmax=4000)
        ref = librosa.pcen(mel * 2**31, sr=8000, hop_length=64)
        np.testing.assert_allclose(feat[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _reference_delta(x, width=9):
    """HTK regression deltas of one clip, edge frames repeated (the per-clip definition)."""
    half, t = width // 2, x.shape[1]
    padded = np.pad(x, ((0, 0), (half, half)), mode="edge")
    num = sum(n * (padded[:, half + n:half + n + t] - padded[:, half - n:half - n + t]) for n in range(1, half + 1))
    return num / (2 * sum(n * n for n in range(1, half + 1)))


def test_mfcc_delta_channels_equal_per_clip_reference():
    cfg = FeatureConfig(representation="mfcc-delta")
    clips = _clips(5, seed=2)
    for clip, feat in zip(clips, features_batch(clips, cfg)):
        mfcc = librosa.feature.mfcc(y=clip, sr=cfg.sample_rate, n_mfcc=13)
        d1 = _reference_delta(mfcc)
        assert feat.shape == (3,) + mfcc.shape
        scale = np.abs(mfcc).max()
        np.testing.assert_allclose(feat[1], d1, atol=1e-3 * scale)
        np.testing.assert_allclose(feat[2], _reference_delta(d1), atol=1e-3 * scale)


@pytest.mark.parametrize("sr", [8000, 16000, 44100, 48000])
def test_resampling_from_common_rates(tmp_path, sr):
    path = write_tone(tmp_path / f"t{sr}.wav", seconds=0.5, sr=sr)
    y = load_audio(str(path), 22050)
    ref, _ = librosa.load(str(path), sr=22050)
    assert len(y) == len(ref)
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_stereo_is_mixed_down(tmp_path):
    path = tmp_path / "stereo.wav"
    t = np.arange(8000) / 8000
    sf.write(path, np.stack([np.sin(2 * np.pi * 300 * t), np.zeros_like(t)], axis=1) * 0.5, 8000)
    y = load_audio(str(path), 8000)
    np.testing.assert_allclose(y, 0.25 * np.sin(2 * np.pi * 300 * t), atol=1e-4)


def test_long_file_is_read_only_up_to_max_seconds(tmp_path):
    path = write_tone(tmp_path / "long.wav", seconds=600, sr=8000)
    y = load_audio(str(path), 8000, max_seconds=30)
    assert len(y) == 30 * 8000


def test_silence_gives_finite_features(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(8000, np.float32), 8000)
    feats, errors = file_features([str(path)], FeatureConfig())
    assert not errors and np.isfinite(feats[0]).all()


def _bad_files(tmp_path):
    good = write_tone(tmp_path / "good.wav")
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:30])
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "text.wav"
    text.write_text("hello, I am not audio\n")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan, 0.2] * 100, np.float32), 8000, subtype="FLOAT")
    inf = tmp_path / "inf.wav"
    sf.write(inf, np.array([0.1, np.inf, 0.2] * 100, np.float32), 8000, subtype="FLOAT")
    other = tmp_path / "notes.aiff2"
    other.write_text("x")
    return {truncated: "not a readable audio file", empty: "empty file", text: "not a readable audio file",
            nan: "NaN or infinite", inf: "NaN or infinite", other: "unsupported extension"}


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    for path, reason in _bad_files(tmp_path).items():
        with pytest.raises(BadAudio) as e:
            load_audio(str(path), 22050)
        message = str(e.value)
        assert str(path) in message and reason in message and "\n" not in message


def test_truncated_real_wav_and_one_sample_wav_are_bad_files(tmp_path, fsdd_dir):
    cut = tmp_path / "2_nicolas_39.wav"
    cut.write_bytes((fsdd_dir / "2_nicolas_39.wav").read_bytes()[:60])  # header promises 1801 frames, 8 present
    one = write_tone(tmp_path / "one.wav", seconds=1 / 8000)
    cfg = FeatureConfig(sample_rate=8000, n_fft=512, win_length=256)
    feats, errors = file_features([str(cut), str(one), str(fsdd_dir / "2_nicolas_39.wav")], cfg)
    assert feats[:2] == [None, None] and feats[2] is not None
    assert [e.reason.split(":")[0] for e in errors] == ["truncated", "too short"]
    assert "3586 more bytes" in str(errors[0]) and "1 samples at 8000 Hz" in str(errors[1])


def test_file_features_reports_bad_files_and_keeps_good_ones(tmp_path):
    bad = _bad_files(tmp_path)
    paths = [str(tmp_path / "good.wav")] + [str(p) for p in bad]
    feats, errors = file_features(paths, FeatureConfig())
    assert feats[0] is not None and all(f is None for f in feats[1:])
    assert sorted(e.path for e in errors) == sorted(paths[1:])


def test_extract_in_processes_matches_in_process(tmp_path):
    paths = [str(write_tone(tmp_path / f"{i}.wav", seconds=0.2 + 0.1 * i, freq=200 + 50 * i)) for i in range(6)]
    (tmp_path / "bad.wav").write_text("no")
    paths.append(str(tmp_path / "bad.wav"))
    cfg = FeatureConfig()
    serial, e1 = extract(paths, cfg, workers=1, progress=False)
    parallel, e2 = extract(paths, cfg, workers=2, progress=False, chunk=2, clips_per_worker=1)
    for a, b in zip(serial[:-1], parallel[:-1]):
        # Workers pin BLAS to one thread; this process may use several, and a float32 sum in another order
        # differs by a few ulps of its largest terms (3.8e-6 seen on values of ~500 on a 2-core AMD EPYC):
        # 1e-6 of the clip's largest magnitude bounds that, and is 1000x below any real feature change.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(a).max())
    assert [e.path for e in e1] == [e.path for e in e2] == [paths[-1]]


def test_vtlp_warp_equals_a_per_band_reference():
    from jaxtl.audio import warp_bands

    feat = np.random.default_rng(7).normal(size=(1, 40, 9)).astype(np.float32)
    assert np.array_equal(warp_bands(feat, 1.0), feat)
    for factor in (0.9, 1.13):
        warped = warp_bands(feat, factor)
        for r in range(40):  # band r shows band r * factor, interpolated; the top band past the top
            ref = np.array([np.interp(min(r * factor, 39), np.arange(40), feat[0, :, t]) for t in range(9)])
            np.testing.assert_allclose(warped[0, r], ref, rtol=1e-5, atol=1e-6)


def test_perturbed_copy_changes_tempo_and_pitch():
    from jaxtl.audio import perturb_audio

    sr = 16000
    t = np.arange(sr) / sr
    y = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    slower = perturb_audio(y, sr, (0.0, 0.8))
    assert abs(len(slower) - len(y) / 0.8) < 0.01 * len(y)
    higher = perturb_audio(y, sr, (12.0, 1.0))
    spectrum = np.abs(np.fft.rfft(higher))
    assert abs(np.argmax(spectrum) * sr / len(higher) - 880) < 10


def test_small_jobs_start_no_worker_pool_and_a_dead_pool_falls_back(tmp_path, monkeypatch, caplog):
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    paths = [str(write_tone(tmp_path / f"{i}.wav", seconds=0.2, freq=300 + 40 * i)) for i in range(4)]
    want, _ = extract(paths, FeatureConfig(), workers=1, progress=False)

    class DeadPool:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def map(self, *a, **k):
            raise BrokenProcessPool("a worker re-ran the caller's script")

        def shutdown(self, *a, **k):
            pass

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", DeadPool)
    small, _ = extract(paths, FeatureConfig(), workers=2, progress=False, chunk=1)  # 4 clips: no pool
    assert not caplog.records
    fallback, _ = extract(paths, FeatureConfig(), workers=2, progress=False, chunk=1, clips_per_worker=1)
    assert "extracting the remaining clips in this process" in caplog.text
    for a, b, c in zip(want, small, fallback):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
