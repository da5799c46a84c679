"""Report of the stability study (:mod:`train.stability`): the markdown table and the figures.

``summarize(records, ...)`` turns the per-run records into the accuracy grid (mean ± std over
seeds, skipped steps) and a per-cell detail table (residuals, measured contraction at the
fixed point, hypergradient error); ``plot(records, ...)`` writes ``stability_accuracy.png``,
``stability_contraction.png``, ``stability_hypergrad.png`` and ``stability_residuals.png``.
"""

from __future__ import annotations

import math
import os

from train.atomic import pyplot, write_png

__all__ = ["MODES", "summarize", "plot", "label", "fmt"]

MODES = ("itd", "aid-fp", "aid-normalcg", "aid-gmres", "jfb")




def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def label(setting: str) -> str:
    if setting == "projection":
        return "projection ≤0.99"
    if setting.startswith("none@"):
        return f"none, A₀ = {setting[5:]}·Q"
    if setting == "monotone":
        return "monotone (monDEQ, PR)"
    return "none" if setting == "none" else f"spectral γ={setting}"


def fmt(x: float, spec: str = ".2e") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def summarize(records: list[dict], modes: list[str], settings: list[str], n_test: int) -> tuple[str, dict]:
    """The markdown table (accuracy grid + per-cell details) and the aggregated numbers."""
    cells: dict = {}
    for s in settings:
        for m in modes:
            rs = [r for r in records if r["mode"] == m and r["setting"] == s]
            if not rs:
                continue
            accs = [100 * r["test_acc"] for r in rs]
            last = [r["checkpoints"][-1] for r in rs]
            errs = [c["hypergrad_error"] for r in rs for c in r["checkpoints"][1:]]
            tail = lambda key, r: _nanmean(r[key][-max(1, len(r[key]) // 10):])
            cells[(s, m)] = dict(
                acc=sum(accs) / len(accs), acc_std=_std(accs), n=len(rs),
                skipped=sum(len(r["skipped"]) for r in rs), steps=sum(r["steps"] for r in rs),
                restored=sum(1 for r in rs for e in r["events"] if e["reason"].startswith("non-finite weights")),
                fwd=_nanmean([tail("forward_residual", r) for r in rs]),
                bwd=_nanmean([tail("backward_residual", r) for r in rs]),
                fwd_div=sum(r["forward_divergence"] for r in rs),
                rho=max(c["rho_worst"] for c in last), norm=max(c["norm_worst"] for c in last),
                lip=max(c["lipschitz"] for c in last),
                err_median=sorted(errs)[len(errs) // 2] if errs else math.nan,
                err_final=_nanmean([c["hypergrad_error"] for c in last]) if all(
                    math.isfinite(c["hypergrad_error"]) for c in last) else math.inf,
                ref_valid=all(c["ref_valid"] for r in rs for c in r["checkpoints"]),
            )
    seeds = sorted({r["seed"] for r in records})
    lines = [f"Test accuracy (%) on {n_test:,} MNIST test digits, mean ± std over seeds {seeds}; "
             "in brackets: skipped steps (diverged adjoint solves) / total steps.", ""]
    lines.append("| mode | " + " | ".join(label(s) for s in settings) + " |")
    lines.append("|---|" + "---|" * len(settings))
    for m in modes:
        row = [m]
        for s in settings:
            c = cells.get((s, m))
            row.append("–" if c is None else f"{c['acc']:.2f} ± {c['acc_std']:.2f}"
                       + (f" [{c['skipped']}/{c['steps']}]" if c["skipped"] else ""))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Spread (max − min of the mean accuracies over modes) per setting: "
              + ", ".join(f"{label(s)}: {_spread(cells, s, modes):.2f} pp" for s in settings), ""]
    lines.append("| setting | mode | acc % | skipped | restores | fwd residual (last 10%) | "
                 "bwd residual (last 10%) | fwd diverged | ‖A‖₂ | ‖∂₁Φ‖₂ worst | ρ(∂₁Φ) worst | "
                 "hypergrad rel. err (median / final) | reference converged |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in settings:
        for m in modes:
            c = cells.get((s, m))
            if c is None:
                continue
            lines.append(
                f"| {label(s)} | {m} | {c['acc']:.2f} | {c['skipped']}/{c['steps']} | {c['restored']} | "
                f"{fmt(c['fwd'])} | {fmt(c['bwd'])} | {c['fwd_div']} | {c['lip']:.3f} | {c['norm']:.3f} | "
                f"{c['rho']:.3f} | {fmt(c['err_median'])} / {fmt(c['err_final'])} | "
                f"{'yes' if c['ref_valid'] else 'no'} |")
    return "\n".join(lines) + "\n", {f"{s}|{m}": v for (s, m), v in cells.items()}


def _spread(cells: dict, setting: str, modes: list[str]) -> float:
    accs = [cells[(setting, m)]["acc"] for m in modes if (setting, m) in cells]
    return max(accs) - min(accs) if accs else math.nan


def _mean_curve(records: list[dict], key: str) -> list[float]:
    length = min(len(r[key]) for r in records)
    return [_nanmean([r[key][i] for r in records]) for i in range(length)]


def plot(records: list[dict], modes: list[str], settings: list[str], folders: list[str]) -> list[str]:
    """The four figures, each written into every folder of ``folders``; returns the paths."""
    plt = pyplot()
    colors = dict(zip(MODES, ("C0", "C1", "C2", "C3", "C4")))
    written = []

    def out(name: str) -> list[str]:
        paths = [os.path.join(f, name) for f in folders]
        written.extend(paths)
        return paths

    # 1. final test accuracy per setting and mode
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(1, len(modes))
    for j, m in enumerate(modes):
        xs, ys, es = [], [], []
        for i, s in enumerate(settings):
            accs = [100 * r["test_acc"] for r in records if r["mode"] == m and r["setting"] == s]
            if accs:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(sum(accs) / len(accs))
                es.append(_std(accs))
        ax.bar(xs, ys, width, yerr=es, label=m, color=colors[m])
    ax.set_xticks(range(len(settings)), [label(s) for s in settings])
    accs = [100 * r["test_acc"] for r in records]
    ax.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 2))
    ax.set(ylabel="test accuracy (%)", title="final test accuracy (MNIST-5k, t = k = 20)")
    ax.legend(ncol=len(modes), fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    write_png(fig, *out("stability_accuracy.png"))

    # 2.-4. curves over training, one column per setting
    panels = [
        ("stability_contraction.png", "measured contraction at w_t", [("rho_worst", "-", "ρ(∂₁Φ) worst"),
                                                                      ("norm_worst", ":", "‖∂₁Φ‖₂ worst"),
                                                                      ("lipschitz", "--", "‖A‖₂")], "linear"),
        ("stability_hypergrad.png", "hypergradient relative error", [("hypergrad_error", "-", "")], "log"),
    ]
    for name, title, series, yscale in panels:
        fig, axes = plt.subplots(1, len(settings), figsize=(3.3 * len(settings), 3.2), sharey=True, squeeze=False)
        for ax, s in zip(axes[0], settings):
            for m in modes:
                rs = [r for r in records if r["mode"] == m and r["setting"] == s]
                if not rs:
                    continue
                steps = [c["step"] for c in rs[0]["checkpoints"]]
                for key, style, legend in series:
                    ys = [_nanmean([r["checkpoints"][i][key] if math.isfinite(r["checkpoints"][i][key]) else math.nan
                                    for r in rs]) for i in range(len(steps))]
                    ax.plot(steps, ys, style, color=colors[m], label=f"{m} {legend}".strip())
            if yscale == "linear":
                ax.axhline(1.0, color="k", lw=0.6)
            ax.set(title=label(s), xlabel="optimiser step", yscale=yscale)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(title)
        handles, labels = axes[0][0].get_legend_handles_labels()
        keep = list(zip(handles, labels))
        if len(series) > 1:
            keep = [(h, text) for h, text in keep if series[0][2] in text]
        if keep:
            axes[0][-1].legend(*zip(*keep), fontsize=7)
        if len(series) > 1:
            fig.suptitle(f"{title}: solid ρ(∂₁Φ), dotted ‖∂₁Φ‖₂, dashed ‖A‖₂ (worst sample)", fontsize=9)
        fig.tight_layout()
        write_png(fig, *out(name))

    fig, axes = plt.subplots(2, len(settings), figsize=(3.3 * len(settings), 5.6), sharey="row", squeeze=False)
    for col, s in enumerate(settings):
        for m in modes:
            rs = [r for r in records if r["mode"] == m and r["setting"] == s]
            if not rs:
                continue
            for row, key in enumerate(("forward_residual", "backward_residual")):
                ys = _mean_curve(rs, key)
                if all(math.isnan(v) for v in ys):
                    continue
                win = max(1, len(ys) // 50)
                smooth = [_nanmean(ys[i : i + win]) for i in range(0, len(ys), win)]
                axes[row][col].plot([i * win for i in range(len(smooth))], smooth, color=colors[m], label=m)
        axes[0][col].set(title=label(s), yscale="log")
        axes[1][col].set(xlabel="optimiser step", yscale="log")
        for row in range(2):
            axes[row][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("forward residual after t steps")
    axes[1][0].set_ylabel("adjoint residual after k steps")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    write_png(fig, *out("stability_residuals.png"))
    return written
