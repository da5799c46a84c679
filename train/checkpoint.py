"""Training checkpoints that hold data only: tensors and plain containers, never pickled code.

A checkpoint is a dictionary of the model's and the optimiser's state dicts, the random
number generators' states (torch's as a tensor, Python's ``random`` as a tuple of ints) and
whatever plain values the caller adds (epoch, step, history, configuration).  It is written
through a temporary file and renamed (:mod:`train.atomic`), so a killed process leaves the
previous checkpoint intact, and read with ``torch.load(..., weights_only=True)``: a file that
carries anything else, such as an object whose unpickling would call a function, is refused
with :class:`CheckpointError` before any of it runs.

    save_checkpoint(path, model, optimizer, epoch=3, step=150, history=history)
    state = load_checkpoint(path, model, optimizer, device)   # model, optimiser and RNGs restored
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
from collections.abc import Callable

import torch
from torch import nn

from train.atomic import write_atomic

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "resume", "rng_state", "set_rng_state"]


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read back, or holds more than data."""


def rng_state() -> dict:
    """The global random number generators' states as a tensor and plain tuples of ints."""
    version, internal, gauss = random.getstate()
    return dict(torch=torch.get_rng_state(), python=(version, tuple(internal), gauss))


def set_rng_state(state: dict) -> None:
    """Restore the states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, **state) -> None:
    """Write the model, the optimiser, the RNG states and ``state`` (plain values) to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), rng=rng_state(), **state), buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """Restore ``model``, ``optimizer`` and the RNG states from ``path``; returns the rest of
    the checkpoint (``epoch``, ``step``, ``history`` and what else was saved)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"corrupt checkpoint {path}: {type(err).__name__}: {err}; "
                                  "delete it to start from scratch") from err
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it asks to run {found.group(1)}" if found else "it holds objects other than tensors and plain data"
        raise CheckpointError(f"refused checkpoint {path}: {what} on loading; only tensors and plain containers "
                              "are read (nothing in it was run)") from None
    except Exception as err:  # torch.load raises zip, EOF and OS errors of many kinds
        raise CheckpointError(f"corrupt checkpoint {path}: {type(err).__name__}: {err}; "
                              "delete it to start from scratch") from err
    try:
        model.load_state_dict(ckpt.pop("model"))
        optimizer.load_state_dict(ckpt.pop("optimizer"))
        set_rng_state(ckpt.pop("rng"))
        _ = ckpt["epoch"], ckpt["step"], ckpt["history"]
    except Exception as err:  # a missing key, a state dict of another model
        raise CheckpointError(f"corrupt checkpoint {path}: {type(err).__name__}: {err}; "
                              "delete it to start from scratch") from err
    return ckpt


def resume(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
           log: Callable[[str], None], modules: dict[str, nn.Module] | None = None) -> tuple[int, int, list[dict]]:
    """Epochs done, optimiser steps taken and the per-epoch history of the checkpoint at
    ``path`` (model, optimiser and RNGs restored in place, and each of ``modules`` from the
    state dict saved under its name, when there is one); ``(0, 0, [])`` if there is none."""
    if not os.path.exists(path):
        log(f"--resume: no checkpoint at {path}, starting from scratch")
        return 0, 0, []
    ckpt = load_checkpoint(path, model, optimizer, device)
    for name, module in (modules or {}).items():
        if ckpt.get(name) is not None:
            module.load_state_dict(ckpt[name])
    log(f"resumed from {path} after epoch {ckpt['epoch']} (step {ckpt['step']})")
    return ckpt["epoch"], ckpt["step"], ckpt["history"]
