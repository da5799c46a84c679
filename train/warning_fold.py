"""Solver warnings folded into one line per stretch of training, with a count.

A training loop can meet thousands of :class:`~implicitnets.ConvergenceWarning`; inside
``with FoldedWarnings("epoch 3") as folded:`` they are collected, and on leaving the block each
kind is issued once, as ``epoch 3: 812 solver warnings, first: ...``.  Other warnings pass
through as they were.

    with FoldedWarnings("epoch 3") as folded:
        train_one_epoch()
    log["convergence_warnings"] = folded.convergence
"""

from __future__ import annotations

import warnings

import implicitnets as inn

__all__ = ["FoldedWarnings"]

# the folded kinds, and how the summary line names them
KINDS = {inn.ConvergenceWarning: "solver warnings", RuntimeWarning: "warnings"}


class FoldedWarnings:
    """Collect the warnings of a ``with`` block; on exit fold each kind of :data:`KINDS` into
    one line naming ``where`` (with ``reissue=False``: only count them).  ``convergence``: the
    number of convergence warnings."""

    def __init__(self, where: str, reissue: bool = True) -> None:
        self.where, self.reissue = where, reissue
        self.convergence = 0
        self._catcher = warnings.catch_warnings(record=True)

    def __enter__(self) -> FoldedWarnings:
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        self._catcher.__exit__(*exc)
        folded: dict[type, list[warnings.WarningMessage]] = {kind: [] for kind in KINDS}
        for w in self._caught:
            kind = next((k for k in KINDS if issubclass(w.category, k)), None)
            if kind is None:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            else:
                folded[kind].append(w)
        for kind, found in folded.items():
            if found and self.reissue:
                warnings.warn(f"{self.where}: {len(found)} {KINDS[kind]}, first: {found[0].message}", kind,
                              stacklevel=2)
        self.convergence = len(folded[inn.ConvergenceWarning])
