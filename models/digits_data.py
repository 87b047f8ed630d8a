"""sklearn `load_digits` (bundled with scikit-learn, no download) as 16x16
images in [-1, 1]: 8x8 values 0..16 -> /16 -> bilinear x2 -> *2-1."""
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits


def load_digits_16():
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [1797,1,8,8] in [0,1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    return x.contiguous(), y
