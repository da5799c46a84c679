"""Per-sample warm starts: each training sample's last fixed point (and adjoint solution),
kept by its index in the data set, as the start of its next solve.

Over the epochs of training on a fixed data set a sample's fixed point moves only as far as
the weights do, so the last one is a far better start than zero (StreamDEQ makes the same
observation across video frames).  A start never changes what a solve converges to, only how
many iterations it takes to get within ``tol``: a stale entry (after augmentation, a large
step, or a resumed run) costs iterations, never correctness.

    cache = inn.SampleCache(len(train_set))
    z0 = cache.start("w", index, cell.initial_state(x))      # rows seen before: their last w
    w = layer(x, z0=z0, adjoint_x0=cache.start("v", index, None))
    loss(w).backward()
    cache.store("w", index, w)
    cache.store("v", index, layer.stats.backward.adjoint)    # AID's adjoint solution

The cache is an ``nn.Module`` of buffers, so ``state_dict`` saves it with a checkpoint and
``.to(device)`` moves it.  Under DistributedDataParallel each process keeps the entries of
the samples it saw.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .options import check_int
from .state import State, pack, parts

__all__ = ["SampleCache"]


class SampleCache(nn.Module):
    """Stored states of ``size`` samples, by name (e.g. ``"w"`` for the fixed point, ``"v"``
    for the adjoint solution); each name holds one row per sample for every part of its state.

    Args:
        size: the number of samples in the data set (indices run from 0 to ``size − 1``).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        check_int("SampleCache", "size", size)
        self.size = size
        self._parts: dict[str, int] = {}

    def _buffer(self, name: str, i: int) -> str:
        return f"{name}__{i}"

    def _check_index(self, index: Tensor) -> Tensor:
        if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            raise ValueError(f"SampleCache: index must be a 1-D integer tensor of data-set indices, got {index!r}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise ValueError(f"SampleCache: index out of range [0, {self.size}): {index.min()}..{index.max()}")
        return index

    def start(self, name: str, index: Tensor, default: State | None) -> State | None:
        """The start for the samples ``index``: a stored row where there is one, ``default``'s
        row otherwise (``None`` when nothing is stored under ``name`` and no ``default``)."""
        index = self._check_index(index)
        if name not in self._parts:
            return default
        n = self._parts[name]
        seen = getattr(self, f"{name}__seen")[index.to(getattr(self, f"{name}__seen").device)]
        out = []
        for i in range(n):
            stored = getattr(self, self._buffer(name, i))[index.to(getattr(self, self._buffer(name, i)).device)]
            if default is None:
                if not bool(seen.all()):
                    return None  # some rows have no start: no warm start for this batch
                out.append(stored)
                continue
            d = parts(default)[i]
            mask = seen.to(d.device).view(-1, *([1] * (d.dim() - 1)))
            out.append(torch.where(mask, stored.to(d), d))
        like = default if default is not None else (out[0] if n == 1 else tuple(out))
        return pack(like, out)

    @torch.no_grad()
    def store(self, name: str, index: Tensor, value: State | None) -> None:
        """Keep ``value`` (detached; rows in the order of ``index``) as the samples' last state
        under ``name``; ``None`` (e.g. no adjoint solve ran) stores nothing."""
        if value is None:
            return
        index = self._check_index(index)
        tensors = parts(value)
        if any(t.shape[0] != index.numel() for t in tensors):
            raise ValueError(
                f"SampleCache.store: {name!r} has {[tuple(t.shape) for t in tensors]} rows for {index.numel()} indices"
            )
        if name not in self._parts:
            first = tensors[0]
            self.register_buffer(f"{name}__seen", torch.zeros(self.size, dtype=torch.bool, device=first.device))
            for i, t in enumerate(tensors):
                self.register_buffer(self._buffer(name, i), t.new_zeros((self.size, *t.shape[1:])))
            self._parts[name] = len(tensors)
        if len(tensors) != self._parts[name]:
            raise ValueError(f"SampleCache.store: {name!r} had {self._parts[name]} parts, got {len(tensors)}")
        for i, t in enumerate(tensors):
            buf = getattr(self, self._buffer(name, i))
            if buf.shape[1:] != t.shape[1:]:
                raise ValueError(f"SampleCache.store: {name!r} rows have shape {tuple(buf.shape[1:])}, "
                                 f"got {tuple(t.shape[1:])}")
            buf.index_copy_(0, index.to(buf.device), t.detach().to(buf))
        seen = getattr(self, f"{name}__seen")
        seen.index_fill_(0, index.to(seen.device), True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # the buffers are created on first use: create those the state dict holds, then load
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                continue
            local = key[len(prefix):]
            name, _, part = local.rpartition("__")
            if not name or local in self._buffers:
                continue
            self.register_buffer(local, torch.empty_like(value))
            if part.isdigit():
                self._parts[name] = max(self._parts.get(name, 0), int(part) + 1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"size={self.size}, names={sorted(self._parts)}"
