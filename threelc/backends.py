"""The codec's fused operations, behind one interface with one implementation per backend.

The transports (``threelc.hooks``) call only these five operations:

    encode        compensate with the residual, quantize, pack, zero-run encode: a payload
    decode        N payloads of one layout summed in rank order (and averaged) into ``out``
    absmax        max|x + residual| per segment, bounded by max|x| (the allreduce transport agrees on it)
    encode_lanes  quantize with agreed scales into lane-packed int64 words
    decode_lanes  the average, from lane words summed by an integer all-reduce

``TorchCodec`` composes them from the pure-PyTorch functions of this package: it is
the reference, the fallback, and the path for devices without a kernel. ``NativeCodec``
runs the fused C++ kernels of ``threelc/native`` (built by ``pip install``) on CPU
tensors, releasing the GIL, with ``torch.get_num_threads()`` threads. Both give the
same bytes and the same float bits for every input; the tests hold them to that.

``TritonCodec`` (threelc/triton) runs Triton kernels on CUDA tensors, and on CPU tensors
through Triton's interpreter under ``TRITON_INTERPRET=1``.

``THREELC_BACKEND`` picks one: ``auto`` (default: triton on CUDA when triton imports,
native on CPU when it is built), ``native``, ``triton`` (for any tensor triton can
take) or ``torch``. ``threelc.backend()`` names the one in use.
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigurationError, DecodeError
from .interface import Codec, Encoded, Layout, payload_error
from .lanes import pack_lanes, unpack_lane_sums, word_count
from .quantize import (_check_input, bounded_absmax, cap_scales, check_scale_cap, dequantize, quantize_with_scales,
                       scales_from_absmax, segment_absmax, subtract_decoded)
from .wire import DTYPE_CODES, decode_quantized, encode_quantized

try:
    from . import _native
except ImportError:  # not built: no compiler at install time, or a source checkout without `pip install`
    _native = None

BACKEND_VARIABLE = "THREELC_BACKEND"
BACKENDS = ("auto", "native", "triton", "torch")


class TorchCodec(Codec):
    """The reference: the package's pure-PyTorch functions, any device."""

    name = "torch"

    @staticmethod
    def _gather(x: torch.Tensor, layout: Layout) -> torch.Tensor:
        flat = x.reshape(-1)
        if layout.contiguous and flat.numel() == layout.numel:
            return flat
        return torch.cat([flat[o:o + n] for o, n in zip(layout.offsets, layout.segments)])

    @staticmethod
    def _scatter(values: torch.Tensor, layout: Layout, out: torch.Tensor) -> None:
        for piece, o, n in zip(values.split(list(layout.segments)), layout.offsets, layout.segments):
            out[o:o + n] = piece

    def _compensated(self, x, residual, layout):
        compensated = self._gather(x, layout).to(torch.float32, copy=True)
        if residual is not None:
            compensated.add_(self._gather(residual, layout))
        return compensated

    def _store_residual(self, compensated, q, scales, layout, x, residual_out):
        new = subtract_decoded(compensated, q, scales, list(layout.segments))
        if layout.contiguous and x.numel() == layout.numel:
            return new if residual_out is None else residual_out.copy_(new)
        if residual_out is None:
            residual_out = torch.zeros(x.numel(), dtype=torch.float32, device=x.device)
        self._scatter(new, layout, residual_out)
        return residual_out

    def _absmax(self, x, residual, compensated, layout, bounded):
        segments = list(layout.segments)
        maxima = segment_absmax(compensated, segments)
        if bounded and residual is not None:  # without a residual max|x + r| is max|x|
            maxima = bounded_absmax(maxima, segment_absmax(self._gather(x, layout), segments))
        return maxima

    def encode(self, x, residual, layout, sparsity, *, dtype=None, feedback=True, residual_out=None, zre=True,
               bounded=True, scale_cap=None):
        _check_input(x)
        segments = list(layout.segments)
        scale_cap = check_scale_cap(scale_cap, len(segments), x.device)
        compensated = self._compensated(x, residual, layout)
        scales = scales_from_absmax(self._absmax(x, residual, compensated, layout, bounded), sparsity)
        scales = cap_scales(scales, scale_cap)
        if not bool(torch.isfinite(scales).all()):
            return Encoded(torch.empty(0, dtype=torch.uint8, device=x.device), scales, None, False, 0)
        q = quantize_with_scales(compensated, scales, segments)
        payload = encode_quantized(q, scales, segments, dtype or x.dtype, zre=zre)
        zeros = q.numel() - int(torch.count_nonzero(q))
        new = self._store_residual(compensated, q, scales, layout, x, residual_out) if feedback else None
        return Encoded(payload, scales, new, True, zeros)

    def decode(self, payloads, layout, out, *, average=True):
        segments = list(layout.segments)
        total = torch.zeros(layout.numel, dtype=torch.float32, device=out.device) if average else None
        for index, payload in enumerate(payloads):
            try:
                q, scales, header = decode_quantized(payload)
            except DecodeError as error:
                raise payload_error(index, error) from error
            if header.segments != segments:
                raise payload_error(index, f"describes {header.numel} elements in {len(header.segments)} segments; "
                                            f"expected {layout.numel} in {len(segments)}")
            decoded = dequantize(q, scales, segments)
            if not average:
                total = decoded
                break
            total += decoded
        if average:
            total.div_(len(payloads))
        self._scatter(total, layout, out)
        return out

    def absmax(self, x, residual, layout, *, bounded=True):
        return self._absmax(x, residual, self._compensated(x, residual, layout), layout, bounded)

    def encode_lanes(self, x, residual, layout, scales, world_size, *, feedback=True, residual_out=None):
        compensated = self._compensated(x, residual, layout)
        q = quantize_with_scales(compensated, scales, list(layout.segments))
        words = pack_lanes(q, world_size)
        zeros = q.numel() - int(torch.count_nonzero(q))
        new = self._store_residual(compensated, q, scales, layout, x, residual_out) if feedback else None
        return words, new, zeros

    def decode_lanes(self, words, layout, scales, world_size, out):
        sums = unpack_lane_sums(words, layout.numel, world_size)
        self._scatter(dequantize(sums, scales, list(layout.segments)).div_(world_size), layout, out)
        return out


def _pointer(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


class NativeCodec(Codec):
    """The fused C++ kernels (threelc/native), CPU tensors only."""

    name = "native"

    @staticmethod
    def _check(x: torch.Tensor, layout: Layout, what: str = "input") -> None:
        if x.device.type != "cpu" or not x.is_contiguous():
            raise ConfigurationError(f"the native codec takes contiguous CPU tensors; the {what} is on {x.device}"
                                     + ("" if x.is_contiguous() else " and not contiguous"))
        if x.numel() < layout.extent():
            raise ConfigurationError(f"the {what} holds {x.numel()} elements; its layout reaches {layout.extent()}")

    def encode(self, x, residual, layout, sparsity, *, dtype=None, feedback=True, residual_out=None, zre=True,
               bounded=True, scale_cap=None):
        x, residual, residual_out = self._prepare(x, residual, layout, feedback, residual_out)
        segments, offsets = layout.table()
        count = len(layout.segments)
        scale_cap = check_scale_cap(scale_cap, count, x.device)
        buffer = torch.empty(_native.payload_capacity(count, layout.numel), dtype=torch.uint8)
        scales = torch.empty(count, dtype=torch.float32)
        length, finite, zeros = _native.encode(
            x.data_ptr(), DTYPE_CODES[x.dtype], _pointer(residual), _pointer(residual_out), segments.data_ptr(),
            offsets.data_ptr(), count, float(sparsity), DTYPE_CODES[dtype or x.dtype], zre, buffer.data_ptr(),
            scales.data_ptr(), torch.get_num_threads(), bool(bounded), _pointer(scale_cap))
        if not finite:
            return Encoded(buffer[:0], scales, None, False, 0)
        return Encoded(buffer[:length], scales, residual_out, True, zeros, buffer)

    def decode(self, payloads, layout, out, *, average=True):
        self._check_decode(payloads, layout, out, average)
        views = []
        for index, payload in enumerate(payloads):
            if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
                raise payload_error(index, f"a payload is a uint8 tensor; got {type(payload).__name__}")
            views.append(payload.reshape(-1).contiguous().cpu())
        pointers = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64)
        sizes = torch.tensor([v.numel() for v in views], dtype=torch.int64)
        segments, offsets = layout.table()
        status, message = _native.decode(pointers.data_ptr(), sizes.data_ptr(), len(views), segments.data_ptr(),
                                         offsets.data_ptr(), len(layout.segments), out.data_ptr(), average,
                                         torch.get_num_threads())
        if status:
            raise payload_error(status - 1, message)
        return out

    def absmax(self, x, residual, layout, *, bounded=True):
        _check_input(x)
        x = x.reshape(-1)
        self._check(x, layout)
        segments, offsets = layout.table()
        out = torch.empty(len(layout.segments), dtype=torch.float32)
        _native.absmax(x.data_ptr(), DTYPE_CODES[x.dtype], _pointer(self._residual(residual, x)), segments.data_ptr(),
                       offsets.data_ptr(), len(layout.segments), out.data_ptr(), torch.get_num_threads(), bool(bounded))
        return out

    def encode_lanes(self, x, residual, layout, scales, world_size, *, feedback=True, residual_out=None):
        x, residual, new = self._prepare(x, residual, layout, feedback, residual_out)
        scales = scales.to(torch.float32).contiguous()
        words = torch.empty(word_count(layout.numel, world_size), dtype=torch.int64)
        segments, offsets = layout.table()
        zeros = _native.encode_lanes(x.data_ptr(), DTYPE_CODES[x.dtype], _pointer(residual), _pointer(new),
                                     segments.data_ptr(), offsets.data_ptr(), len(layout.segments), scales.data_ptr(),
                                     world_size, words.data_ptr(), torch.get_num_threads())
        return words, new, zeros

    def decode_lanes(self, words, layout, scales, world_size, out):
        self._check(out, layout, "output")
        if words.dtype != torch.int64 or words.numel() != word_count(layout.numel, world_size):
            raise ConfigurationError(f"{words.numel()} words cannot hold {layout.numel} lanes for world size {world_size}")
        words, scales = words.contiguous(), scales.to(torch.float32).contiguous()
        segments, offsets = layout.table()
        _native.decode_lanes(words.data_ptr(), scales.data_ptr(), segments.data_ptr(), offsets.data_ptr(),
                             len(layout.segments), world_size, out.data_ptr(), torch.get_num_threads())
        return out


TORCH = TorchCodec()
NATIVE = NativeCodec() if _native is not None else None
_TRITON: list = []  # [TritonCodec or None] once looked for: importing triton takes a second


def triton_codec() -> Codec | None:
    """The Triton codec, or None when triton does not import."""
    if not _TRITON:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON.append(None)
        else:
            from .triton import TritonCodec
            _TRITON.append(TritonCodec())
    return _TRITON[0]


def _requested() -> str:
    name = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ConfigurationError(f"{BACKEND_VARIABLE}={name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "native" and NATIVE is None:
        raise ConfigurationError(f"{BACKEND_VARIABLE}=native, but threelc's native codec is not built "
                                 "(reinstall with a C++ compiler: pip install -e .)")
    if name == "triton" and triton_codec() is None:
        raise ConfigurationError(f"{BACKEND_VARIABLE}=triton, but triton does not import (pip install triton)")
    return name


def codec_for(device: torch.device | str) -> Codec:
    """The codec for tensors on ``device``, as ``THREELC_BACKEND`` asks."""
    name, kind = _requested(), torch.device(device).type
    if name == "torch":
        return TORCH
    if kind == "cuda" and name in ("auto", "triton") and triton_codec() is not None:
        return triton_codec()
    if kind == "cpu" and name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return triton_codec()
    if kind != "cpu" or NATIVE is None:
        return TORCH
    return NATIVE


def backend(device: torch.device | str = "cpu") -> str:
    """Name of the codec backend used for tensors on ``device``: ``"native"``, ``"triton"`` or ``"torch"``."""
    return codec_for(device).name
