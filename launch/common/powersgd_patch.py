"""A workaround for a PyTorch bug in ``batched_powerSGD_hook``, applied before registering it.

Its own module because it replaces a private function of PyTorch
(``powerSGD_hook._orthogonalize``): one place to delete when PyTorch fixes it.
"""

from __future__ import annotations


def patch_batched_orthogonalize(ps) -> None:
    """Work around a PyTorch bug in ``batched_powerSGD_hook``.

    Since ``_orthogonalize`` was rewritten for *batches* of matrices (3-D), the
    batched hook still hands it a single 2-D ``side x rank`` matrix and fails
    with a bare ``AssertionError`` (seen on torch 2.13).  Give 2-D inputs a
    leading batch dim of 1; the view shares storage, so the in-place
    orthogonalization still lands in the hook's tensor.  Idempotent; 3-D
    calls (the per-layer hook) are untouched.
    """
    orig = ps._orthogonalize
    if getattr(orig, "_threelc_launch_shim", False):
        return

    def _orthogonalize(matrices, epsilon=0):
        if matrices.dim() == 2:
            return orig(matrices.unsqueeze(0), epsilon)
        return orig(matrices, epsilon)

    _orthogonalize._threelc_launch_shim = True
    ps._orthogonalize = _orthogonalize
