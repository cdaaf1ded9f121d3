"""Preloaded by the feature-extraction fork server, so every forked worker starts ready.

It limits BLAS/OpenMP to one thread per worker (the workers already use every core; nested threads
made two workers slower than one here) and pays librosa's first-call cost (lazy imports, numba,
about 1.4 s) once instead of once per worker.
"""

import numpy as np
from threadpoolctl import threadpool_limits

from jaxtl.audio import FeatureConfig, features_batch

threadpool_limits(1)
features_batch([np.zeros(4096, np.float32)], FeatureConfig())
