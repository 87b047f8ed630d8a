"""Small CNN classifier on the 16x16 sklearn digits (same preprocessing as the
DDPM: values in [-1, 1]).  Its 64-d penultimate features are the fixed feature
space for a Frechet distance ("FID for digits").

    /tmp/mvenv/bin/python models/train_digits_classifier.py

Outputs (models/): digits_features.onnx (outputs `logits` [N,10], `features` [N,64]),
digits_features_ref.json (feature mean / covariance over all 1797 images, accuracy),
digits_features.inputs.safetensors, digits_features.outputs.safetensors.
"""
import os

# libgomp spin-waiting makes 2-thread CPU training ~10x slower when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import n_params, out_path, seed_all, verify_and_save_io, write_summary
from digits_data import load_digits_16

EPOCHS = 60
BATCH = 64
FEAT = 64


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, FEAT, 3, padding=1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(FEAT, 10)

    def forward(self, sample):
        h = F.silu(self.conv1(sample))
        h = F.max_pool2d(F.silu(self.conv2(h)), 2)  # 8x8
        h = F.max_pool2d(F.silu(self.conv3(h)), 2)  # 4x4
        h = F.silu(self.conv4(h))  # SiLU (not ReLU): no dead units -> full-rank feature covariance
        features = h.mean(dim=(2, 3))  # [N, 64] global average pool
        logits = self.fc(self.dropout(features))
        return logits, features


def frechet_distance(mu1, s1, mu2, s2):
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (as in FID)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def augment(x, g):
    """Random integer shifts of up to 1 pixel (no flips: digits are not symmetric)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if dy == 1:
        x[:, :, 0, :] = -1
    elif dy == -1:
        x[:, :, -1, :] = -1
    if dx == 1:
        x[:, :, :, 0] = -1
    elif dx == -1:
        x[:, :, :, -1] = -1
    return x


def train(x, y, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    n = x.shape[0]
    for ep in range(EPOCHS):
        model.train()
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            logits, _ = model(augment(x[idx].clone(), g))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        sched.step()
        if (ep + 1) % 10 == 0:
            print(f"  epoch {ep + 1:3d} loss {tot / n:.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(x)[0].argmax(1) == y).float().mean())


def main():
    seed_all(0)
    x, y = load_digits_16()
    n = x.shape[0]
    t0 = time.time()

    # held-out estimate (80/20 split) -- this model is not shipped
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42))
    tr, te = perm[: int(0.8 * n)], perm[int(0.8 * n):]
    print("train on 80% split (held-out accuracy estimate)")
    m_split = train(x[tr], y[tr], seed=1)
    heldout = accuracy(m_split, x[te], y[te])
    print(f"held-out accuracy (20%, {len(te)} images): {heldout:.4f}")

    print("train on all 1797 images (shipped model)")
    model = train(x, y, seed=0)
    train_acc = accuracy(model, x, y)
    print(f"train accuracy: {train_acc:.4f}; params {n_params(model)}; {time.time() - t0:.1f}s")

    with torch.no_grad():
        _, feats = model(x)
    feats = feats.double().numpy()
    mu = feats.mean(0)
    cov = np.cov(feats, rowvar=False)  # unbiased (N-1)
    ev = np.linalg.eigvalsh(cov)
    print(f"features: dim {feats.shape[1]}, cov eigen min {ev.min():.3e} max {ev.max():.3e}, "
          f"rank {int((ev > 1e-10 * ev.max()).sum())}")
    ref = {
        "feature_dim": FEAT,
        "num_images": int(n),
        "data": "sklearn load_digits, 8x8 /16 -> bilinear 16x16 -> *2-1 (range [-1,1])",
        "onnx": "digits_features.onnx",
        "input": "sample float32 [N,1,16,16] in [-1,1]",
        "features": "output `features`: global-average-pooled SiLU(conv4), i.e. the layer before the final Linear",
        "covariance": "np.cov(features, rowvar=False) (unbiased, divides by N-1), row-major F x F",
        "frechet_distance": "||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))",
        "train_accuracy": round(train_acc, 6),
        "heldout_accuracy_80_20_split_separate_model": round(heldout, 6),
        "params": n_params(model),
        "fd_sanity": {},
        "mean": [float(v) for v in mu],
        "cov": [[float(v) for v in row] for row in cov],
    }

    # sanity numbers: FD of a random half vs the full set; FD of N(0,1) noise
    g = torch.Generator().manual_seed(3)
    half = torch.randperm(n, generator=g)[: n // 2]
    fh = feats[half.numpy()]
    ref["fd_sanity"]["random_half_of_data_vs_ref"] = round(
        frechet_distance(fh.mean(0), np.cov(fh, rowvar=False), mu, cov), 4)
    with torch.no_grad():
        noise = torch.randn(1024, 1, 16, 16, generator=g).clamp(-1, 1)
        fnz = model(noise)[1].double().numpy()
    ref["fd_sanity"]["clamped_gaussian_noise_1024_vs_ref"] = round(
        frechet_distance(fnz.mean(0), np.cov(fnz, rowvar=False), mu, cov), 4)
    print(f"FD sanity: {ref['fd_sanity']}")
    out_path("digits_features_ref.json").write_text(json.dumps(ref, indent=1))

    path = out_path("digits_features.onnx")
    ex = x[:2].clone()  # two real digits (labels 0 and 1)
    torch.onnx.export(model, (ex,), str(path), dynamo=False, opset_version=17, do_constant_folding=True,
                      input_names=["sample"], output_names=["logits", "features"],
                      dynamic_axes={"sample": {0: "N"}, "logits": {0: "N"}, "features": {0: "N"}})
    with torch.no_grad():
        lg, ft = model(ex)
    info = verify_and_save_io(path, {"sample": ex.numpy()}, {"logits": lg.numpy(), "features": ft.numpy()})
    info.update({"params": n_params(model), "exporter": "legacy (dynamo=False)", "train_accuracy": train_acc,
                 "heldout_accuracy": heldout})
    write_summary("digits_features", info)


if __name__ == "__main__":
    main()
