"""Stable Diffusion 1.5-shaped UNet exports with random, seeded weights (the "real scale" workload).

    /tmp/mvenv/bin/python models/export_sd15_unet.py --latent 64     # the real workload (latent 64x64, CFG batch 2)
    /tmp/mvenv/bin/python models/export_sd15_unet.py --latent 32     # quicker
    /tmp/mvenv/bin/python models/export_sd15_unet.py --latent 16     # quickest
    /tmp/mvenv/bin/python models/export_sd15_unet.py --tiny          # models/sd_tiny.* (CI-sized, committed)

Model: diffusers `UNet2DConditionModel` with the SD-1.5 unet config (runwayml/stable-diffusion-v1-5
unet/config.json, typed in below): sample_size 64, 4 -> 4 channels, block_out_channels
(320, 640, 1280, 1280), layers_per_block 2, CrossAttnDownBlock2D x3 + DownBlock2D,
UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3, cross_attention_dim 768,
attention_head_dim 8 (diffusers' name for 8 *heads*), norm_num_groups 32, GELU-gated FF (GEGLU),
1x1-conv proj_in/proj_out: 859,520,964 parameters.  `--tiny` keeps that topology (4 levels, the same
block types, 2 layers per block, 8 heads, cross_attention_dim 768 with 77 tokens) at
block_out_channels (16, 32, 64, 64) (SD's 1:2:4:4 ratios, so the ONNX graph has the same nodes in the
same order as the SD-1.5 export, only narrower), norm_num_groups 8, latent 16x16: 3,081,524 parameters.

Weights (identical for every latent size): `torch.manual_seed(0)` before construction (PyTorch /
diffusers default init), then the same recipe as export_diffusers_unets.randomize_ (every norm weight/bias
+0.1*N(0,1), seed 100), then fixed rescalings chosen so the random network behaves like a denoiser
(SD-1.5 size, latent 16, the reference inputs below; before -> after):
  * time path x sqrt(3) (time_embedding.linear_1/_2 and every resnet time_emb_proj weight): PyTorch's
    default Linear init has std 1/sqrt(3 fan_in), so each layer shrank the time signal (the projection
    added in a mid-block resnet had std 0.04 against 0.23 for the conv features); relative change of
    the output between t = 981 and t = 1: 0.18 -> 0.60.
  * cross-attention (attn2) to_q/to_k x2 (scores x4) and to_v x3: random q/k attend almost uniformly over
    the 77 tokens, which averages the text away; relative change of the output for all-zero text
    states: 0.08 -> 0.34.
  * conv_out x3: output std 0.32 -> 0.91, like a trained epsilon prediction.
  (sd_tiny after: 0.38, 0.35, std 0.93.)
Activation stds through the depth stay in 0.3..1 without this (every block starts with a norm);
nothing blows up or vanishes.

Inputs / output (fixed shapes, legacy TorchScript exporter `dynamo=False`, opset 17):
  sample                f32 [2, 4, H, W]    (H = W = latent; the CFG pair: the same noise twice)
  timestep              i64 [2]             (one per batch element; diffusers also accepts a scalar,
                                             this export takes [batch])
  encoder_hidden_states f32 [2, 77, 768]    (index 0 = "unconditional", 1 = "conditional" stand-ins,
                                             both random N(0,1), NOT real CLIP states)
  out_sample            f32 [2, 4, H, W]
Reference input set (`<name>.inputs.safetensors`): sample = N(0,1) noise (seed 1) repeated for the pair,
timestep [981, 981] (the first step of 50-step PNDM/DDIM with steps_offset 1 and leading spacing),
encoder_hidden_states N(0,1) (seed 1). `<name>.outputs.safetensors` = onnxruntime's output for them.

Files (`--out DIR`, default <repo>/target/sd15/; `--tiny` writes to models/):
  sd15_l{latent}.onnx           graph, every tensor >= ~1 KB in ...
  sd15_l{latent}.onnx.data      ... ONE external data file beside it (onnx.save_model,
                                all_tensors_to_one_file=True, size_threshold=1024)
  sd15_l{latent}.inputs.safetensors / .outputs.safetensors
  sd15_l{latent}.summary.json   io, op histogram, diffs, data layout (for --tiny: models/manifest.json)
  scheduler_config.json         diffusers PNDMScheduler config of SD-1.5 (written from a dict below;
                                --tiny: models/sd_tiny.scheduler_config.json)
--tiny ignores --latent (always 16).  Existing files are reused (nothing is redone) unless --force.
metadata_props: diffusion.train_timesteps=1000, diffusion.beta_schedule=scaled_linear,
diffusion.beta_start=0.00085, diffusion.beta_end=0.012, diffusion.prediction_type=epsilon,
diffusion.sample_shape=4,H,W, diffusion.weights=random-seeded (not trained).

How a 3.4 GB model is exported in bounded memory: the exporter writes the graph into a temporary folder
inside --out; above 2 GB it writes each large initializer to its own file there (the legacy
exporter's external-data mode: 474 files + raw.onnx).  The PyTorch model is then freed, the graph is
loaded without its data, the metadata is added, the data is loaded (one copy, 3.4 GB) and
onnx.save_model writes the single .data file; the temporary folder is removed.  Then check_model(path, full_check=True) and onnxruntime run on
the final file by path.  onnx.save_model does NOT align offsets: tensors are written back to back in
graph-initializer order (offset = previous offset + previous length, no padding); they are multiples of
64 here only because every tensor's byte size is, and 25 of 685 are 4096-aligned by chance.
(size_threshold is compared with sys.getsizeof(raw_data), which counts ~33 bytes of Python object
header, so tensors of ~990 bytes and up go external.)  --tiny uses size_threshold=100000: the 45
tensors of 100 KB and up (7,901,184 B) go to sd_tiny.onnx.data, the other 641 stay inline (sd_tiny.onnx
5,141,592 B), so that each committed file stays under 8 MB.

Measured on this machine (2 cores shared with other jobs, load average ~3.3; torch 2.15 / onnx 1.23.2 /
onnxruntime 1.31.1), `/usr/bin/time -v` of the whole script, fresh run (nothing reused):
  --latent 16   70 s wall, max RSS 4,652,592 KiB (4.44 GiB)
  --latent 32   90 s wall, max RSS 4,692,872 KiB (4.48 GiB)
  --latent 64  115 s wall, max RSS 6,178,764 KiB (5.89 GiB); phases: build + perturb 7 s (4.1 GiB),
               PyTorch forward 20 s, torch.onnx.export 35 s (peak 5.1 GiB), one-data-file conversion 17 s,
               check_model + onnxruntime session and run 30 s (peak 5.9 GiB, the 64x64 activations:
               8 heads x 4096 x 4096 f32 attention scores = 1 GiB per score tensor)
  --tiny        8 s wall, max RSS 1.0 GiB
Disk per latent: .onnx 824,214 B + .onnx.data 3,438,083,840 B (the 859,520,960 f32 weights; the
data files of the three latents are byte-identical) + inputs/outputs safetensors < 1 MB; the temporary
folder needs another ~6.9 GB while the export runs.  onnxruntime vs PyTorch: max|diff| 4.6e-6 / 4.3e-6 /
5.4e-6 (latent 16 / 32 / 64), i.e. ~5e-6 of the output std (0.91).
"""
import os

# libgomp spin-waiting makes 2-thread CPU work ~10x slower when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded; the config is typed in below

import argparse
import gc
import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import onnx
import torch
from diffusers import UNet2DConditionModel

from _common import HERE, n_params, seed_all, verify_and_save_io, write_summary
from check_all import check_external_data
from export_diffusers_unets import SampleOnly, randomize_

OPSET = 17
REPO = HERE.parent

# runwayml/stable-diffusion-v1-5 unet/config.json (the fields that differ from diffusers' defaults are
# all given; the rest are diffusers defaults, which equal SD-1.5's).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", norm_eps=1e-5,
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1,
)
# Same ratios as SD-1.5's (1, 2, 4, 4) so every block has the same layers (a (32, 64, 64, 64) variant
# lacks down_blocks.2's 1x1 shortcut conv, 97 instead of 98 Conv nodes); 2/4/8/8 channels per group and
# per head (SD-1.5: 10/20/40/40).
TINY_UNET = dict(SD15_UNET, block_out_channels=(16, 32, 64, 64), norm_num_groups=8, sample_size=16)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, plus the two fields diffusers fills in
# with their defaults when they are absent (prediction_type, timestep_spacing), made explicit.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

TIME_SCALE = math.sqrt(3.0)
ATTN2_QK_SCALE = 2.0
ATTN2_V_SCALE = 3.0
CONV_OUT_SCALE = 3.0
TIMESTEP = 981
BATCH = 2
TOKENS = 77


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f} s, peak RSS {rss_gb():5.2f} GB] {msg}", flush=True)


def build_unet(config: dict) -> UNet2DConditionModel:
    """Seeded random weights, the same for every latent size (the latent is not a weight shape)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    randomize_(unet, 100)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith(".weight") and (name.startswith("time_embedding.linear_") or ".time_emb_proj." in name):
                p.mul_(TIME_SCALE)
            elif name.endswith((".attn2.to_q.weight", ".attn2.to_k.weight")):
                p.mul_(ATTN2_QK_SCALE)
            elif name.endswith(".attn2.to_v.weight"):
                p.mul_(ATTN2_V_SCALE)
            elif name.startswith("conv_out."):
                p.mul_(CONV_OUT_SCALE)
    for p in unet.parameters():
        p.requires_grad_(False)  # no autograd state while tracing a 64x64 forward
    return unet


def reference_inputs(latent: int) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g).repeat(BATCH, 1, 1, 1)
    ehs = torch.randn(BATCH, TOKENS, 768, generator=g)
    t = torch.full((BATCH,), TIMESTEP, dtype=torch.int64)
    return {"sample": x, "timestep": t, "encoder_hidden_states": ehs}


def metadata(latent: int) -> dict:
    return {
        "diffusion.train_timesteps": "1000",
        "diffusion.beta_schedule": "scaled_linear",
        "diffusion.beta_start": "0.00085",
        "diffusion.beta_end": "0.012",
        "diffusion.prediction_type": "epsilon",
        "diffusion.sample_shape": f"4,{latent},{latent}",
        "diffusion.weights": "random-seeded (not trained); diffusers UNet2DConditionModel, SD-1.5 topology",
    }


def write_scheduler_config(path: Path) -> None:
    path.write_text(json.dumps(SD15_SCHEDULER, indent=2, sort_keys=True) + "\n")
    # The file must be what diffusers reads as SD-1.5's scheduler (no network: from_config on a dict).
    from diffusers import DDIMScheduler, PNDMScheduler
    for cls in (PNDMScheduler, DDIMScheduler):
        s = cls.from_config(json.loads(path.read_text()))
        s.set_timesteps(50)
        assert int(s.timesteps[0]) == TIMESTEP, (cls.__name__, s.timesteps[:3])


def export_raw(model, args: tuple, path: Path, t0: float) -> Path:
    """Legacy export into a temporary folder beside `path` (above 2 GB the exporter writes every
    initializer to its own file there)."""
    tmp = path.parent / f".tmp-{path.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    raw = tmp / "raw.onnx"
    torch.onnx.export(model, args, str(raw), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                      input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"])
    files = list(tmp.iterdir())
    log(f"exported {raw.name} ({len(files)} files in the temporary folder, "
        f"{sum(f.stat().st_size for f in files) / 1e9:.3f} GB)", t0)
    return raw


def to_one_data_file(raw: Path, path: Path, meta: dict, t0: float, size_threshold: int = 1024) -> None:
    """Graph without data -> metadata added -> data loaded (one copy) -> onnx.save_model with the
    tensors of `size_threshold` bytes and up in `<name>.onnx.data` beside `path`, the others inline.
    Call with the PyTorch model already freed."""
    tmp = raw.parent
    m = onnx.load(str(raw), load_external_data=False)
    for k, v in meta.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.load_external_data_for_model(m, str(tmp))
    log("loaded the graph and its data", t0)
    # save_model appends to an existing data file, so write into an empty folder under the final
    # names and move both files into place.
    final_tmp = tmp / "final"
    final_tmp.mkdir()
    onnx.save_model(m, str(final_tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=size_threshold)
    del m
    gc.collect()
    os.replace(final_tmp / (path.name + ".data"), path.parent / (path.name + ".data"))
    os.replace(final_tmp / path.name, path)
    shutil.rmtree(tmp)
    log(f"wrote {path.name} ({path.stat().st_size} B) + {path.name}.data "
        f"({(path.parent / (path.name + '.data')).stat().st_size} B)", t0)


def alignment_report(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    offs, n_inline, inline_bytes = [], 0, 0
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            d = {e.key: e.value for e in t.external_data}
            offs.append((int(d.get("offset", 0)), int(d["length"])))
        else:
            n_inline += 1
            inline_bytes += len(t.raw_data)
    offs.sort()
    contiguous = all(a[0] + a[1] == b[0] for a, b in zip(offs, offs[1:]))
    r = {
        "external_tensors": len(offs),
        "inline_tensors": n_inline,
        "inline_bytes": inline_bytes,
        "back_to_back": contiguous,
        "offsets_mod_4096_zero": sum(o % 4096 == 0 for o, _ in offs),
        "offsets_mod_64_zero": sum(o % 64 == 0 for o, _ in offs),
        "offsets_mod_4_zero": sum(o % 4 == 0 for o, _ in offs),
        "constant_nodes": sum(n.op_type == "Constant" for n in m.graph.node),
    }
    print(f"[layout] {path.name}: {r}")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latent", type=int, default=64, help="latent height = width (64 = SD-1.5 at 512x512)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default <repo>/target/sd15/)")
    ap.add_argument("--tiny", action="store_true", help="models/sd_tiny.* (CI-sized, same topology)")
    ap.add_argument("--force", action="store_true", help="redo even when the files exist")
    a = ap.parse_args()
    t0 = time.time()
    seed_all(0)

    if a.tiny:
        config, latent, name = TINY_UNET, 16, "sd_tiny"
        out = a.out or HERE
        sched = out / "sd_tiny.scheduler_config.json"
    else:
        config, latent, name = SD15_UNET, a.latent, f"sd15_l{a.latent}"
        out = a.out or REPO / "target" / "sd15"
        sched = out / "scheduler_config.json"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.onnx"
    files = [path, out / f"{name}.onnx.data", out / f"{name}.inputs.safetensors",
             out / f"{name}.outputs.safetensors", sched]
    if not a.force and all(f.exists() for f in files):
        check_external_data(path)
        print(f"{name}: all files exist in {out}, reused (--force to redo):")
        for f in files:
            print(f"  {f.name:36s} {f.stat().st_size:>14,d} B")
        return
    write_scheduler_config(sched)

    unet = build_unet(config)
    params = n_params(unet)
    model = SampleOnly(unet).eval()
    log(f"{name}: UNet2DConditionModel, {params:,} params, latent {latent}x{latent}, batch {BATCH}", t0)

    inputs = reference_inputs(latent)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        ref = model(*args).numpy()
        cond_effect = None
        if latent <= 32:  # cheap sanity numbers on the random network (see the docstring)
            r1 = model(inputs["sample"], torch.full((BATCH,), 1, dtype=torch.int64), args[2]).numpy()
            r0 = model(inputs["sample"], args[1], torch.zeros_like(args[2])).numpy()
            rel = lambda b: float(np.linalg.norm(b - ref) / np.linalg.norm(ref))  # noqa: E731
            cond_effect = {"t981_vs_t1": rel(r1), "text_vs_zero_text": rel(r0)}
    assert np.isfinite(ref).all()
    log(f"PyTorch forward: out std {ref.std():.4f}, max|out| {np.abs(ref).max():.4f}"
        + (f"; relative change of out for t=1 {cond_effect['t981_vs_t1']:.3f}, "
           f"for zero text states {cond_effect['text_vs_zero_text']:.3f}" if cond_effect else ""), t0)

    raw = export_raw(model, args, path, t0)
    del model, unet
    gc.collect()
    log("freed the PyTorch model", t0)
    # sd_tiny keeps tensors under 100 KB inline: its 12.3 MB of weights then split into a
    # 5.1 MB graph and a 7.9 MB data file (each under the repository's 8 MB per file), and the
    # tests read a model whose initializers are partly inline, partly external, as exports are.
    to_one_data_file(raw, path, metadata(latent), t0, 100_000 if a.tiny else 1024)

    check_external_data(path)
    layout = alignment_report(path)
    # onnxruntime on the final file (by path, so the .data file beside it is found)
    tol = 1e-4 * max(1.0, float(ref.std()))
    if not a.tiny:
        tol = 5e-3 * float(ref.std())  # 860M params, fp32 summation-order differences through ~60 layers
    info = verify_and_save_io(path, {k: v.numpy() for k, v in inputs.items()}, {"out_sample": ref}, atol=tol)
    log(f"verified: {info['diffs']} (relative to out std {info['diffs_rel_std']})", t0)
    info.update({
        "params": params,
        "exporter": "legacy (dynamo=False)",
        "bytes_onnx": path.stat().st_size,
        "bytes_data": (out / f"{name}.onnx.data").stat().st_size,
        "external_data": f"{name}.onnx.data",
        "layout": layout,
        "out_std": float(ref.std()),
    })
    if cond_effect:
        info["sensitivity"] = cond_effect
    if a.tiny and out == HERE:
        write_summary(name, info)
    else:
        (out / f"{name}.summary.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    for f in files:
        os.chmod(f, 0o644)  # onnx and safetensors create their files 0600
    print(f"{name}: done in {time.time() - t0:.1f} s, peak RSS of this process {rss_gb():.2f} GB")
    for f in files:
        print(f"  {f.name:36s} {f.stat().st_size:>14,d} B")


if __name__ == "__main__":
    main()
