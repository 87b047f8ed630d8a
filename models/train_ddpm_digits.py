"""Train a small epsilon-prediction DDPM UNet on sklearn digits (16x16, 1 channel)
and export the EMA weights to models/ddpm_digits.onnx.

    /tmp/mvenv/bin/python models/train_ddpm_digits.py

Deterministic (seeded, 2 threads).  Env knobs (defaults are what shipped):
    DDPM_STEPS (training steps), DDPM_BATCH, DDPM_LR.
Outputs (models/): ddpm_digits.onnx, ddpm_digits.schedule.json,
ddpm_digits.loss.csv, ddpm_digits.loss.png, ddpm_digits.samples.png,
ddpm_digits.inputs.safetensors, ddpm_digits.outputs.safetensors.
If models/digits_features.onnx exists (train_digits_classifier.py), also prints
the Frechet distance of DDIM-50 samples against digits_features_ref.json.
"""
import os

# libgomp spin-waiting makes 2-thread CPU training ~10x slower when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
import csv
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import add_metadata, n_params, out_path, seed_all, verify_and_save_io, write_summary
from digits_data import load_digits_16

T = 1000
BETA_START, BETA_END = 1e-4, 2e-2
STEPS = int(os.environ.get("DDPM_STEPS", "3500"))
BATCH = int(os.environ.get("DDPM_BATCH", "64"))
LR = float(os.environ.get("DDPM_LR", "2e-3"))
EMA_DECAY = 0.999
CH = 32
TEMB = 128


# ----------------------------------------------------------------------------- model
def timestep_embedding(t, freqs):
    args = t[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, groups=8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, ch, heads=4, groups=8):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww).unbind(1)
        w = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) * (c // self.heads) ** -0.5, dim=-1)
        h = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(b, c, hh, ww)
        return x + self.proj(h)


class DigitsUNet(nn.Module):
    """16x16 -> 8x8 -> 4x4 UNet, channels (32, 64, 64), attention at 4x4."""

    def __init__(self, ch=CH, temb=TEMB):
        super().__init__()
        half = ch // 2
        self.register_buffer(
            "freqs", torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half),
            persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        c1, c2, c3 = ch, 2 * ch, 2 * ch
        self.conv_in = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, temb)
        self.ds1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, temb)
        self.ds2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.down3 = ResBlock(c2, c3, temb)
        self.mid1 = ResBlock(c3, c3, temb)
        self.mid_attn = SelfAttention(c3)
        self.mid2 = ResBlock(c3, c3, temb)
        self.up3 = ResBlock(c3 + c3, c3, temb)
        self.us2 = nn.Conv2d(c3, c3, 3, padding=1)
        self.up2 = ResBlock(c3 + c2, c2, temb)
        self.us1 = nn.Conv2d(c2, c2, 3, padding=1)
        self.up1 = ResBlock(c2 + c1, c1, temb)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, 1, 3, padding=1)

    def forward(self, sample, timestep):
        temb = self.time_mlp(timestep_embedding(timestep.to(torch.float32), self.freqs))
        h = self.conv_in(sample)
        s1 = self.down1(h, temb)
        s2 = self.down2(self.ds1(s1), temb)
        s3 = self.down3(self.ds2(s2), temb)
        h = self.mid2(self.mid_attn(self.mid1(s3, temb)), temb)
        h = self.up3(torch.cat([h, s3], 1), temb)
        h = self.us2(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up2(torch.cat([h, s2], 1), temb)
        h = self.us1(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, s1], 1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- schedule
def alphas_cumprod_np():
    betas = np.linspace(BETA_START, BETA_END, T, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def ddim_sample_ort(sess, noise, steps=50, clip=True):
    """DDIM, eta=0, timesteps 980, 960, ..., 0 (t = 0, 20, ..., 980 reversed);
    the step after t=0 uses alpha_prev = 1 (diffusers set_alpha_to_one=True)."""
    ac = alphas_cumprod_np()
    stride = T // steps
    ts = list(range(0, T, stride))[::-1]
    x = noise.astype(np.float32)
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = sess.run(["noise_pred"], {"sample": x, "timestep": np.full((x.shape[0],), t, np.int64)})[0]
        eps = eps.astype(np.float64)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = np.clip(x0, -1.0, 1.0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps).astype(np.float32)
    return x


def seeded_noise(seeds):
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(1, 1, 16, 16, generator=g))
    return torch.cat(out).numpy()


def save_grid(x, path, nrow=8, scale=4, pad=1):
    from PIL import Image

    x = np.clip((x[:, 0] + 1.0) * 0.5, 0.0, 1.0)
    n, h, w = x.shape
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad), 0.35, np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray((grid * 255).round().astype(np.uint8), mode="L")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def plot_loss(steps, losses, smooth, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, losses, lw=0.4, alpha=0.35, label="loss (per step)")
        ax.plot(steps, smooth, lw=1.5, label="EMA-smoothed (0.99)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("MSE(eps)")
        ax.set_title("ddpm_digits training loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    except ImportError:  # PIL fallback
        from PIL import Image, ImageDraw

        W, H, m = 700, 400, 40
        img = Image.new("RGB", (W, H), "white")
        d = ImageDraw.Draw(img)
        ly = np.log10(np.maximum(np.asarray(losses), 1e-6))
        ls = np.log10(np.maximum(np.asarray(smooth), 1e-6))
        lo, hi = ly.min(), ly.max()

        def pt(i, v):
            return (m + (W - 2 * m) * i / max(1, len(ly) - 1), H - m - (H - 2 * m) * (v - lo) / (hi - lo + 1e-9))

        d.line([pt(i, v) for i, v in enumerate(ly)], fill=(170, 190, 230), width=1)
        d.line([pt(i, v) for i, v in enumerate(ls)], fill=(200, 60, 0), width=2)
        d.rectangle([m, m, W - m, H - m], outline="black")
        d.text((m, 10), f"ddpm_digits loss (log10 {lo:.2f}..{hi:.2f}); final smoothed {smooth[-1]:.4f}", fill="black")
        img.save(path)


# ----------------------------------------------------------------------------- main
def main():
    seed_all(0)
    data, _ = load_digits_16()
    n = data.shape[0]
    model = DigitsUNet()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    nparams = n_params(model)
    print(f"DigitsUNet params: {nparams}")

    ac = torch.from_numpy(alphas_cumprod_np()).float()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / STEPS)))))
    g = torch.Generator().manual_seed(1234)
    rows, smooth_vals, sm = [], [], None
    t0, c0 = time.time(), time.process_time()
    model.train()
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, n, (BATCH,), generator=g)
        x0 = data[idx]
        t = torch.randint(0, T, (BATCH,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(model(xt, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        lv = float(loss.detach())
        sm = lv if sm is None else 0.99 * sm + 0.01 * lv
        rows.append((step, lv))
        smooth_vals.append(sm)
        if step % 500 == 0 or step == 1:
            print(f"step {step:6d}  loss {lv:.4f}  smoothed {sm:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:7.1f}s", flush=True)
    train_s, train_cpu_s = time.time() - t0, time.process_time() - c0
    print(f"trained {STEPS} steps in {train_s:.1f}s wall ({train_cpu_s:.1f}s process CPU time); "
          f"final smoothed loss {sm:.4f}")

    with open(out_path("ddpm_digits.loss.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        for s, lv in rows:
            w.writerow([s, f"{lv:.6f}"])
    plot_loss([r[0] for r in rows], [r[1] for r in rows], smooth_vals, out_path("ddpm_digits.loss.png"))

    # ---------------------------------------------------------------- export EMA weights
    ema.eval()
    onnx_path = out_path("ddpm_digits.onnx")
    ex_sample = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    ex_t = torch.tensor([10, 500], dtype=torch.int64)
    torch.onnx.export(
        ema, (ex_sample, ex_t), str(onnx_path), dynamo=False, opset_version=17, do_constant_folding=True,
        input_names=["sample", "timestep"], output_names=["noise_pred"],
        dynamic_axes={"sample": {0: "N"}, "timestep": {0: "N"}, "noise_pred": {0: "N"}})
    facts = {
        "diffusion.train_timesteps": "1000",
        "diffusion.beta_schedule": "linear",
        "diffusion.beta_start": "0.0001",
        "diffusion.beta_end": "0.02",
        "diffusion.prediction_type": "epsilon",
        "diffusion.sample_shape": "1,16,16",
        "diffusion.trained_on": "sklearn digits 16x16",
    }
    add_metadata(onnx_path, facts)
    with torch.no_grad():
        ref = ema(ex_sample, ex_t).numpy()
    info = verify_and_save_io(onnx_path, {"sample": ex_sample.numpy(), "timestep": ex_t.numpy()},
                              {"noise_pred": ref})

    sched_json = {
        "train_timesteps": T, "beta_schedule": "linear", "beta_start": BETA_START, "beta_end": BETA_END,
        "prediction_type": "epsilon", "sample_shape": [1, 16, 16], "trained_on": "sklearn digits 16x16",
        "data_range": [-1.0, 1.0],
        "data_preprocessing": "load_digits 8x8 /16, bilinear (align_corners=False) to 16x16, *2-1",
        "onnx_metadata_props": facts,
        "samples_png": {"sampler": "DDIM", "eta": 0.0, "steps": 50,
                        "timesteps": list(range(0, T, T // 50))[::-1],
                        "final_alpha_cumprod": 1.0, "clip_x0": [-1.0, 1.0],
                        "noise": "seed s in 0..63: torch.Generator().manual_seed(s); torch.randn(1,1,16,16)",
                        "runtime": "onnxruntime CPU on ddpm_digits.onnx"},
        "training": {"steps": STEPS, "batch": BATCH, "optimizer": "Adam", "lr": LR,
                     "lr_schedule": "200-step warmup, cosine to 0.1x", "grad_clip": 1.0,
                     "ema_decay": EMA_DECAY, "exported_weights": "EMA",
                     "final_loss_smoothed_0.99": round(sm, 5), "train_seconds_wall": round(train_s, 1),
                     "train_seconds_process_cpu": round(train_cpu_s, 1),
                     "params": nparams, "threads": torch.get_num_threads()},
    }
    out_path("ddpm_digits.schedule.json").write_text(json.dumps(sched_json, indent=1))

    # ---------------------------------------------------------------- DDIM samples through ORT
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    samples = ddim_sample_ort(sess, seeded_noise(range(64)))
    save_grid(samples, out_path("ddpm_digits.samples.png"))
    print("wrote ddpm_digits.samples.png")

    fd = None
    feat_path = out_path("digits_features.onnx")
    ref_path = out_path("digits_features_ref.json")
    if feat_path.exists() and ref_path.exists():
        from train_digits_classifier import frechet_distance

        r = json.loads(ref_path.read_text())
        fs = ort.InferenceSession(str(feat_path), so, providers=["CPUExecutionProvider"])
        xs = ddim_sample_ort(sess, seeded_noise(range(1000, 1000 + 1024)))
        logits, feats = fs.run(["logits", "features"], {"sample": xs})
        fd = frechet_distance(feats.astype(np.float64).mean(0), np.cov(feats.astype(np.float64), rowvar=False),
                              np.asarray(r["mean"]), np.asarray(r["cov"]))
        hist = np.bincount(logits.argmax(1), minlength=10).tolist()
        print(f"FD(1024 DDIM-50 samples, digits_features) = {fd:.3f}; predicted class histogram {hist}")
        sched_json["eval"] = {"frechet_distance_ddim50_1024_samples": round(fd, 4),
                              "predicted_class_histogram": hist,
                              "noise_seeds": "1000..2023"}
        out_path("ddpm_digits.schedule.json").write_text(json.dumps(sched_json, indent=1))

    info.update({"params": nparams, "exporter": "legacy (dynamo=False)", "final_loss": sm,
                 "train_seconds": train_s, "train_cpu_seconds": train_cpu_s, "fd": fd})
    write_summary("ddpm_digits", info)


if __name__ == "__main__":
    main()
