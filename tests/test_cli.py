"""train.cli: every command-line name builds the library object it documents, and an unknown
name is a ValueError that names the option and the choices."""

from __future__ import annotations

import pytest

import implicitnets as inn
from implicitnets import hypergrad as hg
from implicitnets import linear
from train import cli


@pytest.mark.parametrize("name,cls", [("fp", inn.FixedPointIteration), ("anderson", inn.Anderson),
                                      ("broyden", inn.Broyden), ("pr", inn.PeacemanRachford),
                                      ("fb", inn.ForwardBackward)])
def test_solver_names(name, cls):
    solver = cli.make_solver(name, max_iter=7, tol=1e-5)
    assert type(solver) is cls and solver.max_iter == 7 and solver.tol == 1e-5
    assert set(cli.SOLVERS) == {"fp", "anderson", "broyden", "pr", "fb"}


@pytest.mark.parametrize("name,cls", [("fp", linear.Neumann), ("cg", linear.CG), ("normalcg", linear.NormalCG),
                                      ("gmres", linear.GMRES), ("exact", linear.Exact)])
def test_linear_solver_names(name, cls):
    assert type(cli.make_linear_solver(name, 4)) is cls


@pytest.mark.parametrize("name,cls", [("warn", inn.Warn), ("raise", inn.Raise), ("itd", inn.FallbackITD),
                                      ("jfb", inn.FallbackJacobianFree)])
def test_failure_policy_names_reach_aid(name, cls):
    assert type(cli.make_failure_policy(name)) is cls
    backward = cli.make_backward("aid-cg", 3, on_failure=name)
    assert type(backward.on_failure) is cls and type(backward.linear_solver) is linear.CG


def test_backward_names():
    assert cli.make_backward("itd", 5) == inn.ITD()
    assert cli.make_backward("itd:3", 5) == inn.ITD(truncate=3)
    assert type(cli.make_backward("jfb", 5)) is inn.JacobianFree
    gmres = cli.make_backward("aid-gmres", 6, warm_start=True)
    assert gmres.linear_solver.max_iter == 6 and gmres.linear_solver.restart == 6 and gmres.warm_start
    assert type(cli.make_hypergradient("forward-itd", 9)) is hg.ForwardITD


@pytest.mark.parametrize("call,message", [
    (lambda: cli.make_solver("newton", 1, 0.0), "unknown --solver 'newton'"),
    (lambda: cli.make_linear_solver("bicg", 1), "unknown linear solver 'bicg'"),
    (lambda: cli.make_backward("aid-bicg", 1), "unknown --backward 'aid-bicg'"),
    (lambda: cli.make_backward("itd:x", 1), "itd:K needs an integer"),
    (lambda: cli.make_failure_policy("retry"), "unknown --on-failure 'retry'"),
    (lambda: cli.make_backward("itd", 1, on_failure="retry"), "unknown --on-failure 'retry'"),
    (lambda: cli.make_hypergradient("maml", 3), "unknown --method 'maml'"),
])
def test_unknown_names_are_errors_that_list_the_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call()
