"""train.imaml: the meta-gradients against the closed-form implicit gradient of a quadratic
task (float64), and a short run of the script on the embedded Fashion-MNIST subset."""

from __future__ import annotations

import pytest
import torch

from implicitnets import hypergrad as hg
from train import imaml

D, LAM = 6, 0.7


def quadratic_task(seed: int = 0, step: float = 1.0):
    """L_task(w) = ½ wᵀAw − bᵀw with an *indefinite* A (A + λI still positive definite),
    E(w) = ½‖Cw − d‖²; closed form w* = (A + λI)⁻¹(b + λθ), ∇θ = λ (A + λI)⁻¹ Cᵀ(Cw* − d).
    Inner step size α = step / λ_max(A + λI)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eig = torch.linspace(-0.5, 3.0, D, dtype=torch.float64)
    A = Q @ torch.diag(eig) @ Q.T
    b, d = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    C = torch.randn(4, D, generator=g, dtype=torch.float64)
    theta = torch.randn(D, generator=g, dtype=torch.float64)
    H = A + LAM * torch.eye(D, dtype=torch.float64)
    w_star = torch.linalg.solve(H, b + LAM * theta)
    grad = LAM * torch.linalg.solve(H, C.T @ (C @ w_star - d))
    alpha = step / float(torch.linalg.eigvalsh(H).max())
    phi = imaml.inner_map(lambda w: 0.5 * w @ A @ w - b @ w, LAM, alpha)
    query = lambda w: 0.5 * ((C @ w - d) ** 2).sum()
    return phi, query, theta, w_star, grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


STEPS = 1500  # inner steps: (1 − α(λ_min(A) + λ))^1500 ≈ 1e-24 at this conditioning


@pytest.mark.parametrize("name,k", [("imaml-cg", D + 4), ("imaml-fp", 1500)])
def test_meta_gradient_equals_the_dense_implicit_gradient(name, k):
    phi, query, theta, w_star, grad = quadratic_task()
    g, w, failed = imaml.meta_gradient(imaml.Method(name, k, 1), phi, query, theta, STEPS)
    assert not failed
    assert rel(w, w_star) < 1e-12
    assert rel(g, grad) < 1e-10
    (dense,) = hg.dense_hypergradient(hg.Bilevel(phi, lambda w_, hp: query(w_)), (theta,), w)
    assert rel(dense, grad) < 1e-10


def test_few_cg_steps_are_not_exact_and_fp_is_slower_than_cg():
    phi, query, theta, _, grad = quadratic_task()
    errors = {name: rel(imaml.meta_gradient(imaml.Method(name, 3, 1), phi, query, theta, STEPS)[0], grad)
              for name in ("imaml-cg", "imaml-fp")}
    assert 1e-6 < errors["imaml-cg"] < errors["imaml-fp"]


def test_truncated_itd_from_the_solution_equals_fixed_point_aid_with_as_many_steps():
    phi, query, theta, _, grad = quadratic_task()
    for K in (1, 4, 9):
        itd, _, _ = imaml.meta_gradient(imaml.Method("itd", 0, K), phi, query, theta, STEPS)
        fp, _, _ = imaml.meta_gradient(imaml.Method("imaml-fp", K, 0), phi, query, theta, STEPS)
        assert rel(itd, fp) < 1e-11
    assert rel(itd, grad) > 1e-3  # K = 9 steps is far from the implicit gradient


def test_a_diverging_neumann_adjoint_is_counted_and_cg_on_the_same_task_is_not():
    """With α (λ_max(A) + λ) = 2.5 the inner map's Jacobian I − α(A + λI) has an eigenvalue
    −1.5: the Neumann series diverges (reported), CG on the symmetric positive definite
    α(A + λI) does not care."""
    phi, query, theta, _, _ = quadratic_task(step=2.5)
    _, _, fp_failed = imaml.meta_gradient(imaml.Method("imaml-fp", 20, 0), phi, query, theta, 10)
    _, _, cg_failed = imaml.meta_gradient(imaml.Method("imaml-cg", D + 4, 0), phi, query, theta, 10)
    assert fp_failed and not cg_failed


def test_itd_on_failure_replaces_a_diverged_adjoint_by_backpropagation_through_the_inner_steps():
    phi, query, theta, _, _ = quadratic_task(step=2.5)
    T = 10
    fallback, _, failed = imaml.meta_gradient(imaml.Method("imaml-fp", 20, 0, "itd"), phi, query, theta, T)
    itd, _, _ = imaml.meta_gradient(imaml.Method("itd", 0, T), phi, query, theta, T)
    diverged, _, _ = imaml.meta_gradient(imaml.Method("imaml-fp", 20, 0), phi, query, theta, T)
    assert failed and rel(fallback, itd) < 1e-12
    assert rel(diverged, itd) > 1.0  # what the fallback replaced


def test_first_order_maml_is_the_query_gradient_at_the_adapted_weights():
    phi, query, theta, w_star, _ = quadratic_task()
    g, _, _ = imaml.meta_gradient(imaml.Method("fomaml", 0, 0), phi, query, theta, STEPS)
    wl = w_star.clone().requires_grad_()
    (want,) = torch.autograd.grad(query(wl), wl)
    assert rel(g, want) < 1e-11


def test_quick_run_meta_trains_every_method(tmp_path):
    results = imaml.main(["--quick", "--out", str(tmp_path)])  # the embedded fashion-5k
    trained = [r for r in results if r["method"] != "no meta-training"]
    assert sorted(r["method"] for r in trained) == sorted(imaml.METHODS)
    for r in trained:
        assert r["meta_steps"] == imaml.QUICK["meta_steps"] and len(r["losses"]) == imaml.QUICK["meta_steps"]
        assert r["finite"] and 0.0 <= r["acc"] <= 1.0 and r["ci95"] > 0 and r["ms_per_step"] > 0
        assert r["tasks"] == imaml.QUICK["meta_steps"] * imaml.QUICK["meta_batch"]
        if not r["method"].startswith("imaml"):
            assert r["adjoint_failed"] == 0  # only AID has an adjoint solve to fail
    # every method starts from the same θ₀ on the same tasks: the first meta-step's loss agrees
    first = {r["losses"][0] for r in trained}
    assert max(first) - min(first) < 1e-6
    for name in ("imaml_table.md", "imaml.csv", "summary.json", "losses.json", "imaml.png"):
        assert (tmp_path / name).is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="error: data root not found: .*--data-root"):
        imaml.main(["--quick", "--data", "fashion-mnist", "--data-root", str(tmp_path / "nowhere"), "--out",
                    str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown --methods"):
        imaml.main(["--quick", "--methods", "maml++", "--out", str(tmp_path)])
