"""``tanh`` for map steps: ATen's kernel, kept whole inside compiled CPU graphs.

Inside ``torch.compile`` inductor writes its own CPU code for ``torch.tanh`` (a vectorised
Sleef call), which on one thread is several times slower than ATen's kernel (MKL's VML):
56 µs against 8 µs on a 128 × 200 float32 tensor, AVX-512.  A matrix product goes to the
same ATen kernel in both, so in a map step ``tanh(A w + u)`` the compiled code lost more on
``tanh`` than fusion won.

:func:`tanh` is ``torch.tanh`` in eager mode and on other devices.  While ``torch.compile``
traces it on a CPU tensor it calls the operator ``implicitnets::tanh`` instead, which inductor
does not look into: the compiled code calls ATen's ``tanh`` there.  Its derivative
``x̄ = ȳ ⊙ (1 − y²)`` (from the output ``y``) is written in plain operations, which inductor
fuses with their neighbours, and is itself differentiable.  Only code that calls this
function is affected; nothing changes ``torch.tanh`` or inductor's settings for other code.
``torch.export`` keeps ``aten.tanh``, so an exported program needs nothing of this library.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["tanh"]

# the operator needs torch.library's register_fake / register_vmap (PyTorch >= 2.4); without them
# tanh is torch.tanh everywhere (compiled code then uses inductor's own tanh)
_OPAQUE = hasattr(torch.library, "register_fake") and hasattr(torch.library, "register_vmap")
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

if _OPAQUE:
    _lib = torch.library.Library("implicitnets", "FRAGMENT")
    _lib.define("tanh(Tensor x) -> Tensor")
    _lib.impl("tanh", torch.tanh, "CompositeExplicitAutograd")

    @torch.library.register_fake("implicitnets::tanh", lib=_lib)
    def _tanh_fake(x: Tensor) -> Tensor:
        return torch.empty_like(x)

    @torch.library.register_vmap("implicitnets::tanh", lib=_lib)
    def _tanh_vmap(info: Any, in_dims: tuple[int | None], x: Tensor) -> tuple[Tensor, int | None]:
        return torch.ops.implicitnets.tanh(x), in_dims[0]


class _Tanh(torch.autograd.Function):
    """``y = implicitnets::tanh(x)`` with ``x̄ = ȳ ⊙ (1 − y²)``; traced by ``torch.compile``, so the
    operator itself needs no autograd kernel (whose Python dispatch would cost every call)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.ops.implicitnets.tanh(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def tanh(x: Tensor) -> Tensor:
    """``y = tanh(x)`` elementwise: ``torch.tanh``, or the opaque ``implicitnets::tanh`` (ATen's
    kernel) while ``torch.compile`` (not ``torch.export``) traces a CPU tensor.  Derivative ``1 − y²``.

    Args:
        x: Any floating-point tensor.
    """
    if _OPAQUE and torch.compiler.is_compiling() and not _is_exporting() and x.device.type == "cpu":
        return _Tanh.apply(x)
    return torch.tanh(x)
