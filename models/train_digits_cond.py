"""Train a small class-conditional, v-prediction UNet2DConditionModel (diffusers) on sklearn
digits (16x16, 1 channel) with the class given as cross-attention tokens, and export the EMA
weights to models/digits_cond.onnx.

    /tmp/mvenv/bin/python models/train_digits_cond.py

The class reaches the UNet the way a prompt reaches Stable Diffusion's: as
`encoder_hidden_states` [N, 4, 32], four tokens looked up in a learned table outside the UNet
(the "text encoder" here). 10 % of the training labels are dropped, their tokens replaced by
zeros, so the zero tokens are the unconditional input and classifier-free guidance is
eps_u + G (eps_c - eps_u) with eps_u from zeros: the default unconditional conditioning of
`tfmqc --guidance-scale` (no table needed at deployment for the unconditional half).

Schedule: Stable Diffusion 1.5's (scaled_linear 0.00085..0.012, T = 1000, steps_offset 1,
leading spacing, set_alpha_to_one false, clip_sample false) with prediction_type
v_prediction. Shipped as digits_cond.scheduler_config.json. clip_sample false matters for
guidance: diffusers' DDIM clips x0 but keeps the unclipped eps (use_clipped_model_output
false), and with guided predictions the two disagree; at guidance 3 the samples fall apart
(classifier accuracy 0.05, against 0.98 without clipping).

Deterministic (seeded, 2 threads). Env knobs (defaults are what shipped): COND_STEPS, COND_BATCH,
COND_LR; COND_EVAL_ONLY=1 skips training and export and redoes the samples and the evaluation
from the shipped digits_cond.onnx and class table (the training facts of digits_cond.json
are kept). Outputs (models/): digits_cond.onnx, digits_cond.scheduler_config.json,
digits_cond.calib.safetensors (the class tokens: `encoder_hidden_states` [10,4,32], row k =
class k, and `uncond/encoder_hidden_states` [1,4,32] zeros), digits_cond.inputs.safetensors,
digits_cond.outputs.safetensors, digits_cond.loss.csv, digits_cond.loss.png,
digits_cond.samples.png (DDIM 50 steps, guidance 3, row k = class k), digits_cond.json
(training facts and the evaluation: classifier accuracy of the samples per guidance scale,
Frechet distance).
"""
import os

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
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.numpy import save_file

from _common import add_metadata, n_params, out_path, seed_all, verify_and_save_io, write_summary
from digits_data import load_digits_16
from train_ddpm_digits import plot_loss, save_grid

NAME = "digits_cond"
STEPS = int(os.environ.get("COND_STEPS", "4000"))
BATCH = int(os.environ.get("COND_BATCH", "64"))
LR = float(os.environ.get("COND_LR", "2e-3"))
EMA_DECAY = 0.999
TOKENS, DIM = 4, 32
DROP = 0.1
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def make_unet():
    return UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=DIM, attention_head_dim=8, norm_num_groups=8)


class ClassTokens(nn.Module):
    """Class -> TOKENS x DIM tokens (a learned table); dropped labels give zeros."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(10, TOKENS * DIM)
        nn.init.normal_(self.table.weight, std=1.0)

    def forward(self, y, keep):
        return self.table(y).reshape(-1, TOKENS, DIM) * keep[:, None, None]


class Wrapped(nn.Module):
    """The exported graph: the UNet alone, output = the plain v tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def alphas_cumprod():
    return DDIMScheduler.from_config(SCHEDULER).alphas_cumprod.clone()


def sample_ort(sess, noise, tokens, guidance, steps=50, config=None):
    """diffusers' DDIMScheduler from the shipped config, classifier-free guidance as the
    pipelines do it (batch [uncond; cond], noise_pred = u + G (c - u))."""
    sched = DDIMScheduler.from_config(config or SCHEDULER)
    sched.set_timesteps(steps)
    x = torch.from_numpy(noise)
    n = x.shape[0]
    cond = np.concatenate([np.zeros_like(tokens), tokens]).astype(np.float32)
    for t in sched.timesteps:
        inp = torch.cat([x, x]).numpy()
        ts = np.full((2 * n,), int(t), np.int64)
        out = torch.from_numpy(sess.run(None, {"sample": inp, "timestep": ts, "encoder_hidden_states": cond})[0])
        u, c = out[:n], out[n:]
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return x.numpy()


def main():
    if os.environ.get("COND_EVAL_ONLY"):
        from safetensors.numpy import load_file

        facts = json.loads(out_path(f"{NAME}.json").read_text())
        table = load_file(str(out_path(f"{NAME}.calib.safetensors")))["encoder_hidden_states"]
        out_path(f"{NAME}.scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1) + "\n")
        evaluate(table, facts["training"], facts["onnx_metadata_props"], None)
        return
    seed_all(0)
    data, labels = load_digits_16()
    n = data.shape[0]
    unet = make_unet()
    tokens = ClassTokens()
    model = nn.ModuleDict({"unet": unet, "tokens": tokens})
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    nparams = n_params(unet)
    print(f"{NAME}: UNet2DConditionModel params {nparams}, class table {n_params(tokens)}")

    ac = alphas_cumprod().float()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / STEPS)))))
    g = torch.Generator().manual_seed(4321)
    rows, smooth_vals, sm = [], [], None
    t0, c0 = time.time(), time.process_time()
    model.train()
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, n, (BATCH,), generator=g)
        x0, y = data[idx], labels[idx]
        keep = (torch.rand(BATCH, generator=g) >= DROP).float()
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        pred = unet(xt, t, tokens(y, keep)).sample
        loss = F.mse_loss(pred, v)
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
        if step % 250 == 0 or step == 1:
            print(f"step {step:6d}  loss {lv:.4f}  smoothed {sm:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:7.1f}s", flush=True)
    train_s, train_cpu_s = time.time() - t0, time.process_time() - c0
    print(f"trained {STEPS} steps in {train_s:.1f}s wall ({train_cpu_s:.1f}s process CPU); smoothed loss {sm:.4f}")

    with open(out_path(f"{NAME}.loss.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        for s, lv in rows:
            w.writerow([s, f"{lv:.6f}"])
    plot_loss([r[0] for r in rows], [r[1] for r in rows], smooth_vals, out_path(f"{NAME}.loss.png"))

    # ---------------------------------------------------------------- export the EMA UNet
    ema_unet = Wrapped(ema["unet"]).eval()
    table = ema["tokens"].table.weight.detach().reshape(10, TOKENS, DIM).numpy().astype(np.float32)
    onnx_path = out_path(f"{NAME}.onnx")
    gx = torch.Generator().manual_seed(7)
    ex_sample = torch.randn(2, 1, 16, 16, generator=gx)
    ex_t = torch.tensor([10, 500], dtype=torch.int64)
    ex_c = torch.from_numpy(table[[3, 7]])
    torch.onnx.export(
        ema_unet, (ex_sample, ex_t, ex_c), str(onnx_path), dynamo=False, opset_version=17,
        do_constant_folding=True, input_names=["sample", "timestep", "encoder_hidden_states"],
        output_names=["out_sample"],
        dynamic_axes={"sample": {0: "N"}, "timestep": {0: "N"}, "encoder_hidden_states": {0: "N"},
                      "out_sample": {0: "N"}})
    facts = {
        "diffusion.train_timesteps": "1000",
        "diffusion.beta_schedule": "scaled_linear",
        "diffusion.beta_start": "0.00085",
        "diffusion.beta_end": "0.012",
        "diffusion.prediction_type": "v_prediction",
        "diffusion.sample_shape": "1,16,16",
        "diffusion.trained_on": "sklearn digits 16x16, class as 4 cross-attention tokens, 10% label dropout",
    }
    add_metadata(onnx_path, facts)
    with torch.no_grad():
        ref = ema_unet(ex_sample, ex_t, ex_c).numpy()
    info = verify_and_save_io(onnx_path, {"sample": ex_sample.numpy(), "timestep": ex_t.numpy(),
                                          "encoder_hidden_states": ex_c.numpy()}, {"out_sample": ref})
    save_file({"encoder_hidden_states": np.ascontiguousarray(table),
               "uncond/encoder_hidden_states": np.zeros((1, TOKENS, DIM), np.float32)},
              str(out_path(f"{NAME}.calib.safetensors")))
    out_path(f"{NAME}.scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1) + "\n")
    training = {"steps": STEPS, "batch": BATCH, "optimizer": "Adam", "lr": LR,
                "lr_schedule": "200-step warmup, cosine to 0.1x", "grad_clip": 1.0, "label_dropout": DROP,
                "ema_decay": EMA_DECAY, "exported_weights": "EMA", "loss": "MSE(v)",
                "final_loss_smoothed_0.99": round(sm, 5), "train_seconds_wall": round(train_s, 1),
                "train_seconds_process_cpu": round(train_cpu_s, 1), "params": nparams,
                "threads": torch.get_num_threads()}
    evaluate(table, training, facts, info)


def evaluate(table, training, facts, info):
    """The samples PNG and the classifier accuracy / FD per guidance scale, from the ONNX."""
    onnx_path = out_path(f"{NAME}.onnx")

    # ---------------------------------------------------------------- samples and evaluation
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    def noise(seeds):
        return np.concatenate([torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(int(s))).numpy()
                               for s in seeds])

    classes = np.repeat(np.arange(10), 8)
    grid = sample_ort(sess, noise(range(80)), table[classes], 3.0)
    save_grid(grid, out_path(f"{NAME}.samples.png"), nrow=8)
    print(f"wrote {NAME}.samples.png (row k = class k, DDIM 50, guidance 3)")

    evaluation = {}
    feat_path, ref_path = out_path("digits_features.onnx"), out_path("digits_features_ref.json")
    if feat_path.exists() and ref_path.exists():
        from train_digits_classifier import frechet_distance

        r = json.loads(ref_path.read_text())
        fs = ort.InferenceSession(str(feat_path), so, providers=["CPUExecutionProvider"])
        ys = np.arange(500) % 10
        for gscale in (1.0, 2.0, 3.0):
            xs = sample_ort(sess, noise(range(1000, 1500)), table[ys], gscale)
            logits, feats = fs.run(["logits", "features"], {"sample": xs.astype(np.float32)})
            acc = float((logits.argmax(1) == ys).mean())
            fd = frechet_distance(feats.astype(np.float64).mean(0), np.cov(feats.astype(np.float64), rowvar=False),
                                  np.asarray(r["mean"]), np.asarray(r["cov"]))
            evaluation[f"guidance_{gscale:g}"] = {"classifier_accuracy": round(acc, 4), "frechet_distance": round(fd, 4)}
            print(f"guidance {gscale:g}: 500 DDIM-50 samples, classifier accuracy {acc:.3f}, FD {fd:.3f}")
        # The same at guidance 3 with DDIM's x0 clipping on (diffusers' DDIMScheduler default).
        xs = sample_ort(sess, noise(range(1000, 1500)), table[ys], 3.0, config={**SCHEDULER, "clip_sample": True})
        logits, feats = fs.run(["logits", "features"], {"sample": xs.astype(np.float32)})
        acc = float((logits.argmax(1) == ys).mean())
        evaluation["guidance_3_clip_sample_true"] = {"classifier_accuracy": round(acc, 4)}
        print(f"guidance 3 with clip_sample true: classifier accuracy {acc:.3f}")

    facts_json = {
        "scheduler_config": SCHEDULER,
        "conditioning": {"input": "encoder_hidden_states", "tokens": TOKENS, "dim": DIM,
                         "unconditional": "zeros (10% label dropout during training)",
                         "table": f"{NAME}.calib.safetensors: encoder_hidden_states[k] = class k"},
        "onnx_metadata_props": facts,
        "samples_png": {"sampler": "diffusers DDIMScheduler.from_config(scheduler_config)", "steps": 50,
                        "guidance": 3.0, "rows": "class 0..9, 8 samples each",
                        "noise": "seed s in 0..79: torch.Generator().manual_seed(s); torch.randn(1,1,16,16)"},
        "training": training,
        "eval": {"samples": 500, "noise_seeds": "1000..1499", "classes": "k mod 10", **evaluation},
    }
    out_path(f"{NAME}.json").write_text(json.dumps(facts_json, indent=1) + "\n")
    if info is not None:
        info.update({"params": training["params"], "exporter": "legacy (dynamo=False)",
                     "final_loss": training["final_loss_smoothed_0.99"],
                     "train_seconds": training["train_seconds_wall"],
                     "train_cpu_seconds": training["train_seconds_process_cpu"], "eval": evaluation})
        write_summary(NAME, info)


if __name__ == "__main__":
    main()
