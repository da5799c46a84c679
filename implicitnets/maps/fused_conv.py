"""``relu(A ⋆ z + u)`` as one oneDNN convolution on CPU, for map steps without autograd.

A conv cell's step is a convolution, the addition of the input term ``u`` and the
activation: three passes over the state in eager mode.  oneDNN (PyTorch's CPU convolution
library) can apply the addition and a ReLU to the convolution's output before it is
written, as post-ops of the one primitive; ``torch.compile`` uses the same operator,
``mkldnn::_convolution_pointwise.binary``, when it fuses a CPU convolution with its
neighbours.  (The operator refuses tanh after the sum.)

:func:`fused_conv_step` calls it where that is safe and returns ``None`` elsewhere, so the
caller takes the plain path: with autograd recording (the operator has no derivative), off
CPU, in a dtype other than float32, for an activation other than ReLU, inside
``torch.compile`` (which fuses on its own) or a ``torch.func`` transform, or when PyTorch
was built without oneDNN.  The result equals the plain path's up to float32 rounding (the
sum is formed in the convolution's accumulator).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..transforms import transforms_active

__all__ = ["fused_conv_step"]


def _operator():
    """The fused operator, or ``None`` when this build of PyTorch has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise.binary
    except (AttributeError, RuntimeError):
        return None


_FUSED = _operator()
#: the activations the operator applies after the sum, by the name it takes (it refuses tanh there)
_POST_OPS = ("relu",)


def fused_conv_step(
    z: Tensor, u: Tensor, weight: Tensor, padding: tuple[int, int], activation: str
) -> Tensor | None:
    """``act(conv2d(z, weight, padding=padding) + u)`` (stride 1, no dilation, one group) as one
    oneDNN primitive, or ``None`` when the fused operator does not apply (see the module).

    Args:
        z: The state, (batch, C, H, W).
        u: The input term, shaped like the convolution's output.
        weight: The kernel, (C_out, C, kH, kW).
        padding: The zero padding (ph, pw).
        activation: The activation's name; only ``"relu"`` is fused (else ``None``).
    """
    if _FUSED is None or activation not in _POST_OPS or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and (z.requires_grad or u.requires_grad or weight.requires_grad):
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or transforms_active(t) for t in (z, u, weight)):
        return None
    if u.shape[0] != z.shape[0] or u.shape[2:] != z.shape[2:]:
        return None
    return _FUSED(z, u, weight, None, list(padding), [1, 1], [1, 1], 1, "add", 1.0, activation, [], "")
