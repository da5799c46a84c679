"""Figures of training runs, written atomically as PNGs (:mod:`train.atomic`).

    training_curves(history, "runs/mnist/curves.png", "fc (aid-fp)")
"""

from __future__ import annotations

from train.atomic import pyplot, write_png

__all__ = ["training_curves"]


def training_curves(history: list[dict], path: str, title: str) -> None:
    """Loss (log scale) and accuracy per epoch, train and test, from records with the keys
    ``epoch``, ``train_loss``, ``test_loss``, ``train_acc`` and ``test_acc``."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax1.plot(epochs, [r["test_loss"] for r in history], label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title=title)
    ax2.plot(epochs, [r["train_acc"] for r in history], label="train")
    ax2.plot(epochs, [r["test_acc"] for r in history], label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy", title=f"final test {history[-1]['test_acc']:.4f}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_png(fig, path)
