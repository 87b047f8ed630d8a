"""Export tiny diffusers UNets with random but seeded weights (coverage models).

    /tmp/mvenv/bin/python models/export_diffusers_unets.py

Writes (models/):
  unet2d_attn.onnx            UNet2DModel, batch 1, timestep int64 [1]
  unet2d_attn_dynbatch.onnx   same weights, dynamic batch N, timestep int64 [N]
  unet2d_cond.onnx            UNet2DConditionModel, sample [2,4,16,16], timestep float32 scalar [],
                              encoder_hidden_states [2,8,32]
  unet2d_cond_dynbatch.onnx   same weights, dynamic batch, timestep int64 [N]
and <name>.inputs.safetensors / <name>.outputs.safetensors for each.
All exported with the legacy TorchScript exporter (dynamo=False), opset 17.
"""
import os

# libgomp spin-waiting makes 2-thread CPU training ~10x slower when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel, UNet2DModel

from _common import n_params, out_path, seed_all, verify_and_save_io, write_summary

OPSET = 17


class SampleOnly(nn.Module):
    """Return the plain tensor instead of diffusers' output dataclass."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, *args):
        return self.unet(*args, return_dict=False)[0]


def randomize_(model, seed):
    """diffusers zero-initialises some layers (e.g. nothing here by default, but be safe)
    and GroupNorm affine params are 1/0; perturb every parameter a little so no
    weight is trivially constant, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif p.abs().max() == 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def export(model, args, name, input_names, dynamic_axes=None):
    path = out_path(name)
    torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                      input_names=input_names, output_names=["out_sample"], dynamic_axes=dynamic_axes)
    with torch.no_grad():
        ref = model(*args).numpy()
    info = verify_and_save_io(path, {k: a.numpy() for k, a in zip(input_names, args)}, {"out_sample": ref})
    info.update({"params": n_params(model), "exporter": "legacy (dynamo=False)"})
    write_summary(name[:-5], info)


def main():
    seed_all(0)

    # ------------------------------------------------------------------ UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()
    randomize_(unet, 100)
    m = SampleOnly(unet).eval()
    print(f"UNet2DModel params {n_params(m)}")
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(1, 3, 16, 16, generator=g)
    t1 = torch.tensor([500], dtype=torch.int64)
    export(m, (x1, t1), "unet2d_attn.onnx", ["sample", "timestep"])
    x2 = torch.randn(2, 3, 16, 16, generator=g)
    t2 = torch.tensor([10, 500], dtype=torch.int64)
    export(m, (x2, t2), "unet2d_attn_dynbatch.onnx", ["sample", "timestep"],
           {"sample": {0: "N"}, "timestep": {0: "N"}, "out_sample": {0: "N"}})

    # ------------------------------------------------------------------ UNet2DConditionModel
    torch.manual_seed(1)
    cond = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    randomize_(cond, 101)
    mc = SampleOnly(cond).eval()
    print(f"UNet2DConditionModel params {n_params(mc)}")
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(2, 4, 16, 16, generator=g)
    ts = torch.tensor(500.0, dtype=torch.float32)  # scalar timestep, shared by the CFG batch
    ehs = torch.randn(2, 8, 32, generator=g)
    export(mc, (xs, ts, ehs), "unet2d_cond.onnx", ["sample", "timestep", "encoder_hidden_states"])
    xd = torch.randn(2, 4, 16, 16, generator=g)
    td = torch.tensor([10, 500], dtype=torch.int64)
    ed = torch.randn(2, 8, 32, generator=g)
    export(mc, (xd, td, ed), "unet2d_cond_dynbatch.onnx", ["sample", "timestep", "encoder_hidden_states"],
           {"sample": {0: "N"}, "timestep": {0: "N"}, "encoder_hidden_states": {0: "N"}, "out_sample": {0: "N"}})


if __name__ == "__main__":
    main()
