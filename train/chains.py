"""The long-range chains benchmark of IGNN (Gu et al. 2020), generated in code.

``classes × chains_per_class`` disjoint chains of ``L`` nodes; a chain's class is a one-hot
feature on its first node only, every other node has zero features, and every node carries
its chain's label.  Classifying a node ``d`` hops from the labelled end needs information
from ``d`` hops away.  Nodes are split at random (``train_fraction`` stratified by class)
and trained transductively, full batch, with Adam and a bias-free per-node linear readout:

* implicit: :class:`implicitnets.maps.GraphMap` ``Z = ReLU(W Z Â + Ω X Â)`` with
  ``‖W‖_∞ ≤ κ / λ_pf(Â)`` kept by projection after every step, forward Picard iteration,
  AID backward with the fixed-point (Neumann) adjoint solver;
* GCN: ``depth`` layers ``H ← ReLU(Â H W_l + b_l)`` (the last one to the classes), width
  chosen so the parameter count matches the implicit model's; its receptive field is
  ``depth`` hops.

For each L the script reports test accuracy of both models; chance is ``1 / classes``.

    python -m train.chains                             # writes runs/chains
    python -m train.chains --quick                     # one short length, a few seconds
    python -m train.chains --out train/results/chains  # refresh the committed results

A solve that stops at its iteration limit is counted (``solver_warnings`` per row), not
printed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicitnets as inn
from implicitnets.maps import GraphMap, normalized_adjacency
from train.atomic import pyplot, write_atomic, write_csv, write_png
from train.baseline import matched_size
from train.config import parse_config
from train.warning_fold import FoldedWarnings


@dataclass
class Config:
    out: str = "runs/chains"  # folder for chains.csv, chains.png and summary.json
    lengths: str = "5,10,20,40,60,80,100"  # chain lengths L, comma-separated
    classes: int = 2  # labels (chance: 1 / classes)
    chains_per_class: int = 10  # chains of each label
    train_fraction: float = 0.2  # share of each class's nodes used for training
    width: int = 16  # m, the implicit model's state size per node
    kappa: float = 0.95  # bound on ‖W‖_∞ · λ_pf(Â): the GraphMap's contraction factor
    depth: int = 4  # GCN layers
    epochs: int = 200  # full-batch Adam steps
    lr: float = 0.01  # Adam's learning rate
    forward_iters: int = 1000  # implicit model: at most this many Picard iterations ...
    forward_tol: float = 1e-7  # ... stopping at this relative residual
    backward_iters: int = 1000  # Neumann iterations of the adjoint solve ...
    backward_tol: float = 1e-6  # ... stopping at this relative residual (float32 reaches ~1e-7 at best)
    seed: int = 0  # chains, split and initial weights
    threads: int = 1  # CPU threads (torch.set_num_threads)
    quick: bool = False  # one short length, fewer epochs


QUICK = {"lengths": "12", "chains_per_class": 3, "epochs": 100, "width": 8, "forward_iters": 200, "forward_tol": 1e-6,
         "backward_iters": 200, "backward_tol": 1e-5, "out": "runs/chains-quick"}


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_config(Config, argv, prog="python -m train.chains", description=__doc__,
                        presets={"quick": QUICK}, preset_field="quick")


def make_chains(cfg: Config, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Edges, features (1, classes, n), labels (n,), train mask and each node's distance to
    its chain's labelled end."""
    chains = cfg.classes * cfg.chains_per_class
    n = chains * length
    start = torch.arange(chains) * length
    position = torch.arange(length)
    node = (start[:, None] + position[None, :]).reshape(-1)
    labels = torch.arange(chains).div(cfg.chains_per_class, rounding_mode="floor").repeat_interleave(length)
    grid = node.reshape(chains, length)
    edges = torch.stack([grid[:, :-1].reshape(-1), grid[:, 1:].reshape(-1)])
    features = torch.zeros(1, cfg.classes, n)
    features[0, labels[start], start] = 1.0
    train = torch.zeros(n, dtype=torch.bool)
    for c in range(cfg.classes):
        members = (labels == c).nonzero().squeeze(1)
        count = max(1, round(cfg.train_fraction * len(members)))
        pick = members[torch.randperm(len(members), generator=generator)[:count]]
        train[pick] = True
    return {"edges": edges, "features": features, "labels": labels, "train": train,
            "distance": position.repeat(chains), "n": torch.tensor(n)}


class Implicit(nn.Module):
    """GraphMap equilibrium and a bias-free linear readout per node."""

    def __init__(self, cfg: Config, adjacency: Tensor) -> None:
        super().__init__()
        self.cell = GraphMap(cfg.classes, cfg.width, adjacency, kappa=cfg.kappa)
        self.layer = inn.FixedPointLayer(
            self.cell,
            solver=inn.FixedPointIteration(max_iter=cfg.forward_iters, tol=cfg.forward_tol),
            backward=inn.AID(inn.linear.Neumann(max_iter=cfg.backward_iters, tol=cfg.backward_tol)),
        )
        self.readout = nn.Linear(cfg.width, cfg.classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        z = self.layer(x)  # (1, width, n)
        return self.readout(z[0].t())

    def after_step(self) -> None:
        self.cell.project_()


class GCN(nn.Module):
    """``depth`` graph convolutions ``H ← ReLU(Â H W + b)``, the last without ReLU or bias."""

    def __init__(self, classes: int, hidden: int, depth: int, adjacency: Tensor) -> None:
        super().__init__()
        dims = [classes] + [hidden] * (depth - 1) + [classes]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=i < depth - 1) for i, (a, b) in enumerate(zip(dims, dims[1:])))
        self.adjacency = adjacency

    def forward(self, x: Tensor) -> Tensor:
        h = x[0].t()  # (n, features)
        for i, layer in enumerate(self.layers):
            h = torch.sparse.mm(self.adjacency, layer(h))
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h

    def after_step(self) -> None:
        pass


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gcn_width(cfg: Config, target: int, adjacency: Tensor) -> int:
    """The hidden width whose GCN parameter count is closest to ``target``."""
    return matched_size(lambda h: parameters(GCN(cfg.classes, h, cfg.depth, adjacency)), target)


def train_one(model: nn.Module, data: dict[str, Tensor], cfg: Config) -> dict[str, float]:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x, y, train = data["features"], data["labels"], data["train"]
    start = time.perf_counter()
    losses = []
    with FoldedWarnings("chains", reissue=False) as folded:
        for _ in range(cfg.epochs):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x)[train], y[train])
            loss.backward()
            opt.step()
            model.after_step()
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    test = ~train
    far = test & (data["distance"] > cfg.depth)  # beyond the GCN's receptive field
    return {"train_loss": losses[-1], "test_acc": float(correct[test].float().mean()),
            "far_acc": float(correct[far].float().mean()) if far.any() else float("nan"),
            "seconds": seconds, "parameters": parameters(model), "solver_warnings": folded.convergence,
            "finite": all(map(torch.isfinite, map(torch.tensor, losses)))}


def plot(rows: list[dict], cfg: Config, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(5.5, 3.6))
    for model, style in (("implicit", "o-"), ("gcn", "s--")):
        pts = [(r["length"], 100 * r["test_acc"]) for r in rows if r["model"] == model]
        label = f"implicit (GraphMap, κ = {cfg.kappa})" if model == "implicit" else f"GCN, {cfg.depth} layers"
        ax.plot(*zip(*pts), style, label=label)
    ax.axhline(100 / cfg.classes, color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("chain length L")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 102)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"chains: {cfg.classes} classes, {cfg.chains_per_class} chains per class")
    fig.tight_layout()
    write_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for length in (int(s) for s in cfg.lengths.split(",")):
        data = make_chains(cfg, length, generator)
        adjacency = normalized_adjacency(data["edges"], int(data["n"]))
        torch.manual_seed(cfg.seed)
        implicit = Implicit(cfg, adjacency)
        width = gcn_width(cfg, parameters(implicit), adjacency)
        torch.manual_seed(cfg.seed)
        models = {"implicit": implicit, "gcn": GCN(cfg.classes, width, cfg.depth, adjacency)}
        for name, model in models.items():
            result = train_one(model, data, cfg)
            row = {"length": length, "model": name, **result}
            if name == "implicit":
                row["well_posedness"] = implicit.cell.well_posedness()
                row["forward_iterations"] = implicit.layer.stats.iterations
            rows.append(row)
            print(f"L={length:4d} {name:8s} params={row['parameters']:5d} test={100 * row['test_acc']:6.2f}% "
                  f"beyond {cfg.depth} hops={100 * row['far_acc']:6.2f}% loss={row['train_loss']:.4f} "
                  f"({row['seconds']:.1f} s, {row['solver_warnings']} unconverged solves)", flush=True)
    os.makedirs(cfg.out, exist_ok=True)
    keys = ["length", "model", "parameters", "test_acc", "far_acc", "train_loss", "seconds", "well_posedness",
            "forward_iterations", "solver_warnings"]
    write_csv(os.path.join(cfg.out, "chains.csv"), [{k: r.get(k, "") for k in keys} for r in rows])
    summary = json.dumps({"config": asdict(cfg), "rows": rows}, indent=1)
    write_atomic(os.path.join(cfg.out, "summary.json"), summary.encode())
    plot(rows, cfg, os.path.join(cfg.out, "chains.png"))
    return rows


if __name__ == "__main__":
    main()
