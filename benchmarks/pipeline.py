"""Clips per second from wav files to VGG16-ready images: the seed's per-file loop against jaxtl's
pipeline, cold (no cache) and warm (HDF5 feature cache), on the same files in one run.

    python benchmarks/pipeline.py [--data ../shared/data/fsdd/recordings] [--max-clips N]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import librosa
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_results  # noqa: E402
from jaxtl.audio import FeatureConfig  # noqa: E402
from jaxtl.cache import cached_features  # noqa: E402
from jaxtl.images import RaggedFeatures, row_index, to_images  # noqa: E402


def seed_loop(paths: list[str], size: int) -> np.ndarray:
    """The seed recipe as written: one file at a time through librosa, then a per-clip prepare."""
    out = np.zeros((len(paths), size, size, 3), np.float32)
    rows = row_index(13, size)
    for i, p in enumerate(paths):
        y, sr = librosa.load(p, sr=22050)
        mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=13)
        mfcc = np.pad(mfcc, ((0, 0), (0, max(0, size - mfcc.shape[1]))))[:, :size]
        img = mfcc[rows]
        img = (img - img.min()) / (img.max() - img.min() + 1e-12)
        out[i] = img[..., None]
    return out


def jaxtl_pipeline(paths: list[str], size: int, cache_dir: str, workers: int, dtype: str = "float32") -> np.ndarray:
    feats, errors, _ = cached_features(paths, FeatureConfig(), cache_dir, workers=workers, progress=False)
    ragged = RaggedFeatures.from_list(feats)
    out = []
    for start in range(0, len(paths), 256):
        idx = np.arange(start, min(start + 256, len(paths)))
        batch, lengths = ragged.padded(idx, size)
        out.append(to_images(batch, lengths, size, dtype=dtype))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/fsdd/recordings")
    ap.add_argument("--max-clips", type=int, default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.data, "*.wav")))[:args.max_clips]
    if not paths:
        sys.exit(f"error: no .wav files in {args.data}")
    n = len(paths)
    rows = {}
    t = time.perf_counter()
    ref = seed_loop(paths, args.size)
    rows["seed loop (librosa per file)"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        cold = jaxtl_pipeline(paths, args.size, cache, args.workers)
        rows[f"jaxtl cold ({args.workers} processes, batched)"] = time.perf_counter() - t
        t = time.perf_counter()
        warm = jaxtl_pipeline(paths, args.size, cache, args.workers)
        rows["jaxtl warm (HDF5 feature cache)"] = time.perf_counter() - t
        t = time.perf_counter()
        jaxtl_pipeline(paths, args.size, cache, args.workers, "uint8")
        rows["jaxtl warm, uint8 images (what training feeds the device)"] = time.perf_counter() - t
    err = float(np.abs(ref - cold).max())
    assert np.array_equal(cold, warm), "warm cache must give the same images"
    base = rows["seed loop (librosa per file)"]
    m = machine()
    table = (f"Pipeline, {n} FSDD clips -> {args.size}x{args.size}x3 images; {m['cpu']}, {m['cores']} cores\n\n"
             "| pipeline | seconds | clips/s | speed-up |\n| --- | ---: | ---: | ---: |\n"
             + "".join(f"| {k} | {v:.2f} | {n / v:.0f} | {base / v:.1f}x |\n" for k, v in rows.items())
             + f"\nmax |seed image - jaxtl image| = {err:.2e}\n")
    write_results("pipeline", {"clips": n, "size": args.size, "seconds": rows, "max_abs_diff": err, "machine": m},
                  table)


if __name__ == "__main__":
    main()
