"""A tiny class-conditional UNet following openai/guided-diffusion
(guided_diffusion/unet.py: UNetModel with use_scale_shift_norm, learn_sigma,
num_classes), random but seeded weights, exported with the dynamo exporter.

    /tmp/mvenv/bin/python models/export_guided_unet.py

Writes models/guided_unet.onnx (+ .inputs/.outputs.safetensors).
Inputs: x float32 [N,3,16,16], timesteps float32 [N], y int64 [N] (0..9).
Output: out float32 [N,6,16,16] (3 eps channels + 3 variance-interpolation channels).

Deviation from the original: guided-diffusion zero-initialises the last conv of
every ResBlock, the attention proj_out and the final conv (zero_module); with
random weights that would make most of the graph dead, so here every layer
keeps PyTorch's default (seeded) init.
"""
import os

# libgomp spin-waiting makes 2-thread CPU training ~10x slower when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import n_params, out_path, seed_all, verify_and_save_io, write_summary


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def normalization(ch):
    return nn.GroupNorm(32, ch)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, use_scale_shift_norm=True, dropout=0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=4):
        super().__init__()
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttentionLegacy(num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.proj_out(self.attention(qkv))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    def __init__(self, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2,
                 attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10, num_heads=4,
                 use_scale_shift_norm=True):
        super().__init__()
        self.model_channels = model_channels
        ted = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Embedding(num_classes, ted)
        ch = input_ch = model_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, ted, mult * model_channels, use_scale_shift_norm)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, ch, use_scale_shift_norm), AttentionBlock(ch, num_heads),
            ResBlock(ch, ted, ch, use_scale_shift_norm))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = chans.pop()
                layers = [ResBlock(ch + ich, ted, model_channels * mult, use_scale_shift_norm)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, y):
        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        emb = emb + self.label_emb(y)
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
        return self.out(h)


def main():
    seed_all(0)
    torch.manual_seed(0)
    model = UNetModel().eval()
    print(f"guided UNet params {n_params(model)}")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([10.0, 500.0], dtype=torch.float32)
    y = torch.tensor([3, 7], dtype=torch.int64)
    path = out_path("guided_unet.onnx")
    N = torch.export.Dim("N", min=1, max=1024)
    exporter = "dynamo (torch.onnx.export(..., dynamo=True))"
    try:
        prog = torch.onnx.export(model, (x, t, y), dynamo=True, input_names=["x", "timesteps", "y"],
                                 output_names=["out"], dynamic_shapes=({0: N}, {0: N}, {0: N}),
                                 optimize=True, verify=False)
        prog.save(str(path), external_data=False)
        # drop per-node stack traces (they embed this machine's absolute paths)
        m = onnx.load(str(path))
        for n in m.graph.node:
            keep = [(p.key, p.value) for p in n.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del n.metadata_props[:]
            for k, v in keep:
                n.metadata_props.add(key=k, value=v)
        onnx.save(m, str(path))
    except Exception as e:  # documented fallback
        print(f"dynamo export failed: {e!r}; falling back to the legacy exporter")
        exporter = "legacy (dynamo=False) -- dynamo export failed"
        torch.onnx.export(model, (x, t, y), str(path), dynamo=False, opset_version=17, do_constant_folding=True,
                          input_names=["x", "timesteps", "y"], output_names=["out"],
                          dynamic_axes={"x": {0: "N"}, "timesteps": {0: "N"}, "y": {0: "N"}, "out": {0: "N"}})
    with torch.no_grad():
        ref = model(x, t, y).numpy()
    info = verify_and_save_io(path, {"x": x.numpy(), "timesteps": t.numpy(), "y": y.numpy()}, {"out": ref})
    info.update({"params": n_params(model), "exporter": exporter})
    write_summary("guided_unet", info)


if __name__ == "__main__":
    main()
