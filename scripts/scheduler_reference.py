#!/usr/bin/env python3
"""Reference values of diffusers' schedulers for the runtime's samplers (runtime/src/sampler.rs).

    /tmp/mvenv/bin/python scripts/scheduler_reference.py    # writes tests/data/scheduler_reference.json

Needs diffusers (models/requirements.txt: 0.42.1), torch and numpy; downloads nothing: every
scheduler is built from a config dict. Run once; the JSON is committed and read by
tests/scheduler_reference.rs, which asserts that tfmqc computes the same time steps (exactly)
and the same sampler updates (to 1e-4 relative) for:

  - time steps: DDIM, DDPM, Euler and DPM-Solver++ on several configurations (Stable
    Diffusion 1.5's with leading, trailing and linspace spacing; diffusers' defaults; a cosine
    v-prediction one) at 1, 7, 20, 25, 30 and 50 steps. Euler's linspace spacing gives
    fractional time steps: those entries hold floats and tfmqc must refuse them.
  - updates: whole 10-step trajectories of each sampler on a fixed batch (2 samples of 1x4x4)
    with fixed pseudo model outputs (seeded N(0,1) arrays, one per step, independent of x):
    the model input at each step (Euler's only: the others feed x as it is) and the sample
    after each step. DDPM's noise is given (the same arrays the JSON holds).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
import diffusers.schedulers.scheduling_ddpm as ddpm_module

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "scheduler_reference.json"

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
        "timestep_spacing": "leading"}
CONFIGS = {
    "sd15_leading": SD15,
    "sd15_trailing": {**SD15, "timestep_spacing": "trailing"},
    "sd15_linspace": {**SD15, "timestep_spacing": "linspace"},
    "defaults": {},
    "cosine_v_trailing": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
                          "timestep_spacing": "trailing", "clip_sample": False},
}
CLASSES = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
           "dpm++": DPMSolverMultistepScheduler}
STEP_COUNTS = [1, 7, 20, 25, 30, 50]

# Trajectories: configurations that exercise clipping, thresholding, v and x0 prediction,
# the DPM-Solver++ variants.
UPDATE_CONFIGS = {
    "sd15_leading": SD15,
    "pixel_clip": {},  # DDIM defaults: clip_sample true, set_alpha_to_one true
    "v_pred_trailing": {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "sample_pred": {**SD15, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 2.0},
    "thresholding": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5,
                     "timestep_spacing": "trailing"},
    "dpm_heun_order3": {**SD15, "solver_order": 3, "solver_type": "heun", "lower_order_final": False},
    "dpm_sigma_min": {**SD15, "final_sigmas_type": "sigma_min", "euler_at_final": True},
}
UPDATE_STEPS = 10
SHAPE = (2, 1, 2, 4)


def timesteps_entry(cls, cfg, n):
    s = cls.from_config(cfg)
    s.set_timesteps(n)
    ts = s.timesteps.numpy().astype(np.float64)
    whole = bool(np.all(ts == np.round(ts)))
    return {"timesteps": [int(v) for v in ts] if whole else [float(v) for v in ts], "whole": whole}


def f32_list(a):
    """float32 values, printed with the 9 digits that identify them."""
    return [float(f"{v:.9g}") for v in np.asarray(a, dtype=np.float32).reshape(-1)]


def fixed_arrays():
    rng = np.random.default_rng(1234)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    outputs = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(UPDATE_STEPS)]
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(UPDATE_STEPS)]
    return x0, outputs, noises


def trajectory_entry(name, cls, cfg):
    s = cls.from_config(cfg)
    s.set_timesteps(UPDATE_STEPS)
    x0, outputs, noises = fixed_arrays()
    x = torch.from_numpy(x0) * s.init_noise_sigma
    initial = x.numpy().copy()
    inputs, samples = [], []
    current = {"noise": None}
    orig = ddpm_module.randn_tensor
    ddpm_module.randn_tensor = lambda shape, **kw: current["noise"]
    try:
        for k, t in enumerate(s.timesteps):
            inp = s.scale_model_input(x, t)
            inputs.append(f32_list(inp.numpy()))
            current["noise"] = torch.from_numpy(noises[k])
            x = s.step(torch.from_numpy(outputs[k]), t, x).prev_sample
            samples.append(f32_list(x.numpy()))
    finally:
        ddpm_module.randn_tensor = orig
    return {
        "sampler": name,
        "timesteps": [int(v) for v in s.timesteps.numpy()],
        "init_noise_sigma": float(s.init_noise_sigma),
        "initial": f32_list(initial),
        "model_inputs": inputs if name == "euler" else None,
        "samples": samples,
    }


def main():
    torch.set_num_threads(1)
    x0, outputs, noises = fixed_arrays()
    out = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__,
           "configs": CONFIGS, "timesteps": [], "update_configs": UPDATE_CONFIGS,
           "shape": list(SHAPE), "update_steps": UPDATE_STEPS, "noise": f32_list(x0),
           "model_outputs": [f32_list(o) for o in outputs], "ddpm_noise": [f32_list(n) for n in noises],
           "trajectories": []}
    for cname, cfg in CONFIGS.items():
        for sname, cls in CLASSES.items():
            for n in STEP_COUNTS:
                e = timesteps_entry(cls, cfg, n)
                out["timesteps"].append({"config": cname, "sampler": sname, "steps": n, **e})
    for cname, cfg in UPDATE_CONFIGS.items():
        for sname, cls in CLASSES.items():
            if cname.startswith("dpm_") and sname != "dpm++":
                continue
            if cname == "thresholding" and sname == "euler":
                continue  # Euler has no thresholding
            out["trajectories"].append({"config": cname, **trajectory_entry(sname, cls, cfg)})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(out['timesteps'])} time-step lists, "
          f"{len(out['trajectories'])} trajectories ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
