"""tfmqc: quantize diffusion denoisers with TFMQ-DM and run them on CPUs.

Three things live here:

- ``tfmqc.compile(model, output, **options)``: the compiler, the ``tfmqc`` command's
  options as keywords (``weight_bits=8``, ``sampling_steps="20,50"``, ``keep_float=[...]``);
  returns the quantization report as a dict.
- ``tfmqc.Denoiser(path, threads=None)``: the runtime. Call it with numpy arrays (or torch
  tensors, when torch is installed) positionally, ``model(sample, timestep, *cond)`` ->
  array, or the way diffusers calls a UNet, ``model(sample, timestep,
  encoder_hidden_states=...)`` -> an output with ``.sample``; ``model.sample(seed, steps)``
  runs a whole sampling loop.
- the ``tfmqc`` command (``python -m tfmqc`` too), the same program as the cargo binary.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import _tfmqc

__all__ = ["Denoiser", "DenoiserOutput", "compile", "main", "__version__"]
__version__: str = _tfmqc.__version__

# Options of `tfmqc` that are given once per value (`--keep-float a --keep-float b`);
# other list values are joined with commas (`sampling_steps=[20, 50]` -> `20,50`).
_REPEATED = {"keep_float"}


def compile(model: "os.PathLike[str] | str", output: "os.PathLike[str] | str",
            **options: Any) -> Optional[dict]:
    """Compiles ``model`` (ONNX) into ``output`` as ``tfmqc MODEL -o OUTPUT`` does.

    Keywords are the command's options with ``_`` for ``-``: ``compile(m, o,
    weight_bits=8, sampler="dpm++", sampling_steps=[20, 50], keep_float=["conv_in"],
    print_after_all=True)``; ``True`` gives a bare flag, ``None`` and ``False`` leave an
    option out. Returns the quantization report (what ``--report`` writes) as a dict, or
    None when the passes run quantize nothing. Bad input raises ValueError with the
    command's message; a fault of tfmqc raises RuntimeError.
    """
    argv = ["tfmqc", os.fspath(model), "-o", os.fspath(output)]
    report = options.pop("report", None)
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            if key in _REPEATED:
                for v in value:
                    argv += [flag, os.fspath(v) if isinstance(v, os.PathLike) else str(v)]
            else:
                argv += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, os.PathLike):
            argv += [flag, os.fspath(value)]
        else:
            argv += [flag, str(value)]
    with tempfile.TemporaryDirectory(prefix="tfmqc-") as tmp:
        path = os.fspath(report) if report is not None else os.path.join(tmp, "report.json")
        _tfmqc.run(argv + ["--report", path])
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)


class DenoiserOutput:
    """What a call the diffusers way returns: ``.sample`` (the prediction), and, like
    diffusers' ``UNet2DOutput``, ``output[0]`` for the same value."""

    __slots__ = ("sample",)

    def __init__(self, sample):
        self.sample = sample

    def __getitem__(self, index):
        return self.to_tuple()[index]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self):
        return 1

    def to_tuple(self):
        return (self.sample,)

    def __repr__(self):
        return f"DenoiserOutput(sample={self.sample!r})"


def _torch():
    # torch is never imported here: a tensor can only exist if the caller imported it.
    return sys.modules.get("torch")


def _as_numpy(value, what: str):
    """(numpy array, how to give a result back: None, or the torch tensor it came from)."""
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy(), value
    if isinstance(value, np.ndarray):
        return value, None
    try:
        return np.asarray(value), None
    except Exception as e:  # noqa: BLE001 - any failure is the caller's input
        raise ValueError(f"{what}: not an array ({e})") from None


def _pack(array: np.ndarray):
    array = np.ascontiguousarray(array)
    return (array.dtype.name, list(array.shape), array.tobytes())


def _unpack(result, like=None):
    shape, data = result
    array = np.frombuffer(data, dtype=np.float32).reshape(shape)
    torch = _torch()
    if like is not None and torch is not None:
        return torch.from_numpy(array).to(device=like.device, dtype=like.dtype)
    return array


def _timestep(value) -> int:
    """One time step from an int, a numpy or torch scalar, or a batch of equal steps."""
    array, _ = _as_numpy(value, "the time step")
    flat = np.unique(array.reshape(-1))
    if flat.size != 1:
        raise ValueError(
            f"the time step must be one value for the whole batch, got {flat.tolist()}")
    t = flat[0]
    if isinstance(t, (np.floating, float)):
        if not float(t).is_integer():
            raise ValueError(f"time step {float(t)} is not an integer time step")
    elif not isinstance(t, (np.integer, int)):
        raise ValueError(f"the time step must be a number, got {t!r}")
    return int(t)


class Denoiser:
    """A (tfmqc-compiled) ONNX denoiser on tfmqc's runtime: int8 kernels, time-step
    tables, the diffusers samplers.

    ``threads``: the threads of each call (default: every core); results are the same for
    any count. Errors in the caller's input (a time step outside the model's set S, a
    wrong shape or dtype, a missing conditioning input) raise ValueError with the
    runtime's message.
    """

    def __init__(self, path: "os.PathLike[str] | str", threads: Optional[int] = None):
        self._native = _tfmqc.NativeDenoiser(os.fspath(path), threads)
        self.path = os.fspath(path)

    def __repr__(self):
        return f"tfmqc.{self._native!r}"

    @property
    def inputs(self) -> list:
        """Every input in the model's order: dicts of ``name``, ``role`` (``sample``,
        ``timestep`` or ``conditioning``), ``dtype`` (a numpy name or None) and ``shape``
        (None for a free dimension)."""
        return [
            {"name": n, "role": r, "dtype": d, "shape": None if s is None else tuple(s)}
            for n, r, d, s in self._native.inputs()
        ]

    @property
    def conditioning_inputs(self) -> list:
        """The names of the conditioning inputs, in the order positional calls give them."""
        return [i["name"] for i in self.inputs if i["role"] == "conditioning"]

    @property
    def timesteps(self) -> list:
        """The time-step set S the model accepts, ascending."""
        return self._native.timesteps()

    @property
    def sample_shape(self) -> Optional[tuple]:
        """(C, H, W) of one sample, when the model tells."""
        s = self._native.sample_shape()
        return None if s is None else tuple(s)

    @property
    def int8_ops(self) -> int:
        """How many nodes run on the int8 kernels."""
        return self._native.int8_ops()

    def trajectory(self, steps: int, sampler: str = "ddim") -> list:
        """The time steps ``sampler`` visits in ``steps`` steps, first to last."""
        return self._native.trajectory(sampler, steps)

    def _conditioning(self, positional: Sequence, named: Mapping, what: str = ""):
        names = self.conditioning_inputs
        if len(positional) > len(names):
            raise ValueError(
                f"{len(positional)} conditioning arrays given, the model's conditioning "
                f"inputs are {names}")
        pairs = list(zip(names, positional))
        given = {n for n, _ in pairs}
        for name, value in named.items():
            if value is None:
                continue  # diffusers passes unused options as None
            if name in given:
                raise ValueError(f"conditioning input '{name}' given twice")
            pairs.append((name, value))
        return [(n, _pack(_as_numpy(v, f"{what}'{n}'")[0])) for n, v in pairs]

    def __call__(self, sample, timestep, *conditioning, return_dict: Optional[bool] = None,
                 **named):
        """ε̂ (or v, or x₀: what the model predicts) for ``sample`` [B, C, H, W] at
        ``timestep``.

        Positionally, ``model(sample, timestep, *cond)`` (conditioning in the order of
        ``conditioning_inputs``) returns the prediction as an array (a torch tensor for a
        torch sample). With conditioning by name, ``model(sample, timestep,
        encoder_hidden_states=h)``, or ``return_dict=True``, it returns a
        ``DenoiserOutput`` (``.sample``), as a diffusers UNet does; ``return_dict=False``
        returns the tuple ``(prediction,)``. Keywords whose value is None are ignored.
        """
        x, like = _as_numpy(sample, "the sample")
        t = _timestep(timestep)
        cond = self._conditioning(conditioning, named)
        prediction = _unpack(self._native.denoise(_pack(x), t, cond), like)
        if return_dict is False:
            return (prediction,)
        if return_dict or named:
            return DenoiserOutput(prediction)
        return prediction

    def sample(self, seed: int = 0, steps: int = 25, cond: Optional[Mapping] = None,
               batch: int = 1, sampler: str = "ddim", guidance_scale: Optional[float] = None,
               uncond: Optional[Mapping] = None) -> np.ndarray:
        """``batch`` samples [B, C, H, W] (float32): seeded N(0, 1) noise, then ``steps``
        steps of ``sampler`` (``ddim``, ``ddpm``, ``euler`` or ``dpm++``) under the
        model's scheduler. ``cond``: conditioning by input name (``batch`` rows, or fewer,
        cycled); ``guidance_scale`` with ``uncond`` (the unconditional conditioning, same
        names) runs classifier-free guidance."""
        c = self._conditioning((), dict(cond or {}))
        guidance = None
        if guidance_scale is not None:
            if uncond is None:
                raise ValueError("guidance_scale needs uncond, the unconditional conditioning")
            guidance = (float(guidance_scale), self._conditioning((), dict(uncond), "uncond "))
        return _unpack(self._native.sample(seed, steps, c, batch, sampler, guidance))


def _self_exe() -> Optional[str]:
    """The `tfmqc` script of this installation (what `tfmqc bench` starts its engines with)."""
    arg0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(arg0) == "tfmqc" and os.access(arg0, os.X_OK):
        return arg0
    script = os.path.join(os.path.dirname(sys.executable), "tfmqc")
    return script if os.access(script, os.X_OK) else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``tfmqc`` command: the same program as the cargo binary."""
    import signal

    # The work runs in native code: Ctrl-C stops the process, as it stops the binary.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    args = ["tfmqc", *(sys.argv[1:] if argv is None else argv)]
    return _tfmqc.main(args, _self_exe())
