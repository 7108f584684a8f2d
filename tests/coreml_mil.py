"""A test oracle for Core ML packages: the ML program evaluated op by op in numpy, as the package stores
it (weights from its weight file, each fp16 op's result rounded to float16, arithmetic in float32).

Why: Core ML predicts on macOS only, so on Linux this is how the tests check that a conversion kept the
deploy form's function. It is not Core ML's kernels and never stands in for the runtime's prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixformer_deploy.backends.coreml.runner import FEATURES
from mixformer_deploy.backends.coreml.spec import INPUT, LOGITS, coremltools, read_spec, spec_path
from mixformer_deploy.backends.runner import packed
from mixformer_deploy.errors import ArtifactError, UsageError, one_line


def _f32(v):
    return np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)


def _erf(x):
    try:
        from scipy.special import erf
        return erf(x)
    except ImportError:  # Abramowitz-Stegun 7.1.26 would be too coarse; torch is always here
        import torch
        return torch.erf(torch.from_numpy(np.asarray(x, np.float32))).numpy()


def _conv(x, w, b, strides, pad, dilations, groups):
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    p = [int(v) for v in pad]  # (top, bottom, left, right)
    x = F.pad(x, (p[2], p[3], p[0], p[1]))
    out = F.conv2d(x, torch.from_numpy(np.ascontiguousarray(w, np.float32)),
                   None if b is None else torch.from_numpy(np.asarray(b, np.float32)),
                   stride=tuple(int(s) for s in strides), dilation=tuple(int(d) for d in dilations), groups=int(groups))
    return out.numpy()


def _slice(x, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    idx = []
    for i in range(x.ndim):
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        s = int(stride[i]) if stride is not None else 1
        if squeeze_mask is not None and squeeze_mask[i]:
            idx.append(int(begin[i]))
        else:
            idx.append(slice(b, e, s))
    return x[tuple(idx)]


def _op(op, v):
    """One MIL op on float32 numpy values (the result is cast to the op's own output dtype by the caller)."""
    result = _math_op(op, v)
    if result is NotImplemented:
        result = _layout_op(op, v)
    if result is NotImplemented:
        raise NotImplementedError(f"the numpy MIL reference has no {op.op_type!r} op")
    return result


def _math_op(op, a):
    """Arithmetic, GEMMs, convolution, normalization and activations (NotImplemented: not one of them)."""
    t = op.op_type
    if t in ("add", "sub", "mul", "real_div", "maximum", "minimum", "pow"):
        f = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "maximum": np.maximum,
             "minimum": np.minimum, "pow": np.power}[t]
        return f(a("x"), a("y"))
    if t == "linear":
        out = a("x") @ a("weight").T
        return out + a("bias") if op.inputs.get("bias") is not None else out
    if t == "matmul":
        x, y = a("x"), a("y")
        if a("transpose_x"):
            x = np.swapaxes(x, -1, -2)
        if a("transpose_y"):
            y = np.swapaxes(y, -1, -2)
        return x @ y
    if t == "conv":
        return _conv(a("x"), a("weight"), a("bias") if op.inputs.get("bias") is not None else None, a("strides"),
                     a("pad"), a("dilations"), a("groups"))
    if t == "layer_norm":
        x, axes = a("x"), tuple(int(i) for i in a("axes"))
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + a("epsilon"))
        if op.inputs.get("gamma") is not None:
            y = y * a("gamma")
        return y + a("beta") if op.inputs.get("beta") is not None else y
    if t == "gelu":
        x, mode = a("x"), str(a("mode") or "EXACT")
        if mode == "EXACT":
            return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))
        if mode == "TANH_APPROXIMATION":
            return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
        return x / (1 + np.exp(-1.702 * x))
    if t == "sigmoid":
        return 1.0 / (1.0 + np.exp(-a("x")))
    if t == "relu":
        return np.maximum(a("x"), 0)
    if t == "softmax":
        x, axis = a("x"), int(a("axis"))
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    return NotImplemented


def _layout_op(op, a):
    """Reshapes, reductions, padding, joins and slices (NotImplemented: not one of them)."""
    t = op.op_type
    if t == "reshape":
        return a("x").reshape([int(s) for s in a("shape")])
    if t == "transpose":
        return np.transpose(a("x"), [int(p) for p in a("perm")])
    if t == "reduce_mean":
        axes = a("axes")
        return a("x").mean(axis=None if axes is None else tuple(int(i) for i in axes), keepdims=bool(a("keep_dims")))
    if t == "pad":
        x, pad = a("x"), [int(p) for p in a("pad")]
        widths = [(0, 0)] * (x.ndim - len(pad) // 2) + [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
        if str(a("mode") or "constant") != "constant":
            raise NotImplementedError(f"pad mode {a('mode')}")
        return np.pad(x, widths, constant_values=float(a("constant_val") or 0.0))
    if t == "concat":
        return np.concatenate(a("values"), axis=int(a("axis")))
    if t == "split":
        x, axis = a("x"), int(a("axis"))
        sizes = a("split_sizes")
        if sizes is None:
            sizes = [x.shape[axis] // int(a("num_splits"))] * int(a("num_splits"))
        return tuple(np.split(x, np.cumsum([int(s) for s in sizes])[:-1], axis=axis))
    if t == "slice_by_index":
        return _slice(a("x"), a("begin"), a("end"), a("stride"), a("begin_mask"), a("end_mask"), a("squeeze_mask"))
    if t == "cast":
        return a("x")
    if t in ("identity", "squeeze", "expand_dims"):
        x = a("x")
        if t == "identity":
            return x
        axes = [int(i) for i in a("axes")]
        return np.squeeze(x, axis=tuple(axes)) if t == "squeeze" else np.expand_dims(x, axis=tuple(axes))
    return NotImplemented


class MilReference:
    """The plain form's logits by evaluating the package's ML program op by op in numpy (weights read
    from its weight file; each fp16 op's result rounded to float16, its arithmetic done in float32). A
    check of the conversion on machines without Core ML, not a Core ML prediction."""

    def __init__(self, package: str | Path):
        coremltools()
        from coremltools.converters.mil.frontend.milproto.load import load as load_program

        self.path = Path(package)
        spec = read_spec(self.path)
        names_in = [d.name for d in spec.description.input]
        names_out = [d.name for d in spec.description.output]
        if names_in[:1] != [INPUT] or not (names_out[:1] == [LOGITS] or names_out[0].startswith(FEATURES)):
            raise UsageError(f"{self.path.name}: the numpy reference evaluates the plain form only")
        first = spec.description.input[0].type.multiArrayType
        self.fixed_batch = None if first.HasField("shapeRange") else int(first.shape[0])
        try:
            program = load_program(spec, spec.specificationVersion,
                                   file_weights_dir=str(spec_path(self.path).parent / "weights"))
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: cannot read its ML program ({one_line(e, 200)})") from e
        self.fn = program.functions["main"]
        self.input = self.fn.inputs[INPUT]

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        step = self.fixed_batch or len(x)
        parts = [self._run(x[i:i + step]) for i in range(0, len(x), step)]
        return packed(np.concatenate(p) for p in zip(*parts))

    def _run(self, x: np.ndarray) -> np.ndarray:
        from coremltools.converters.mil.mil import types

        env: dict = {}

        def value(var):
            if var is None:
                return None
            if isinstance(var, (list, tuple)):
                return [value(v) for v in var]
            if var.name in env:
                return env[var.name]
            if var.val is not None:
                return _f32(var.val) if isinstance(var.val, np.ndarray) else var.val
            raise ArtifactError(f"{self.path.name}: value {var.name} is used before it is computed")

        env[self.input.name] = _round(x, types.builtin_to_string(self.input.dtype))
        for op in self.fn.operations:
            if op.op_type == "const":
                continue
            result = _op(op, lambda name: value(op.inputs.get(name)))
            for var, r in zip(op.outputs, result if isinstance(result, tuple) else (result,)):
                env[var.name] = _round(np.asarray(r), types.builtin_to_string(var.dtype))
        return [np.asarray(env[v.name], dtype=np.float32) for v in self.fn.outputs]


def _round(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """A value as the program types it: fp16 values are rounded to float16 (held as float32)."""
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    return x.astype(np.float32) if dtype == "fp32" else x


def mil_reference(package: str | Path, batch: np.ndarray) -> np.ndarray:
    """``MilReference(package).run(batch)``: the ML program evaluated in numpy (not Core ML)."""
    return MilReference(package).run(batch)
