#!/usr/bin/env python3
"""The .npz fixtures of tests/calib_files.rs, as a user writes them with numpy (no tfmqc involved):

    /tmp/mvenv/bin/python tests/data/make_calib_fixtures.py

- stacked.npz: np.savez(sample=x, timestep=t): 8 recorded calls of models/ddpm_digits.onnx
  stacked along axis 0, x float64 [8,1,16,16] (numpy's default dtype), t int64 [8].
- stacked_compressed.npz: the same with np.savez_compressed and float32 x (deflated entries).
"""
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
rng = np.random.default_rng(13)
x = rng.standard_normal((8, 1, 16, 16))
t = np.array([950, 950, 500, 500, 500, 100, 100, 0], dtype=np.int64)
np.savez(HERE / "stacked.npz", sample=x, timestep=t)
np.savez_compressed(HERE / "stacked_compressed.npz", sample=x.astype(np.float32), timestep=t)
print("wrote", HERE / "stacked.npz", HERE / "stacked_compressed.npz")
