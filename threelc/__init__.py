"""threelc: 3LC traffic compression for data-parallel PyTorch training.

The codec (this package) is pure tensor code: quantize with a sparsity multiplier
and error feedback, pack five ternary values per byte, zero-run encode, and wrap the
result in a versioned, self-describing payload. Framework integration lives in
``threelc.hooks``.
"""

from .backends import backend
from .errors import CommunicationError, ConfigurationError, DecodeError, ThreeLCError
from .feedback import ErrorFeedback, Quantized
from .packing import pack, packed_length, unpack
from .quantize import check_sparsity, dequantize, quantize
from .wire import Header, decode, decode_quantized, encode, encode_quantized, read_header
from .zre import zre_decode, zre_encode

__version__ = "0.1.0"

__all__ = [
    "backend", "CommunicationError", "ConfigurationError", "DecodeError", "ErrorFeedback", "Header", "Quantized", "ThreeLCError",
    "check_sparsity", "decode", "decode_quantized", "dequantize", "encode", "encode_quantized",
    "pack", "packed_length", "quantize", "read_header", "unpack", "zre_decode", "zre_encode",
]
