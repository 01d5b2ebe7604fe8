"""The Triton backend of the codec: CUDA kernels, also runnable on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests hold it to the
pure-PyTorch reference without a GPU. Importing this package imports triton."""

from .codec import TritonCodec

__all__ = ["TritonCodec"]
