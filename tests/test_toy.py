"""The toy model (`ihstudy toy`, docs/science.md §5.7): gradients, the closed-form linear
case, the plateau ordering and the command's files and refusals."""

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from ihstudy.analysis.toy import ToyProblem, fit_iterations, loss, run_conditions, train, write_toy
from ihstudy.cli import app


def closed_form_gradient(vectors: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """d/dv of ½·mean((a*⊗b*⊗c* - a⊗b⊗c)²) by hand: for a, (a|b|²|c|² - a*(b·b*)(c·c*)) / dim³."""
    n = vectors.shape[1]
    norms, overlaps = (vectors**2).sum(1), (vectors * true).sum(1)
    rows = []
    for i in range(3):
        others = [j for j in range(3) if j != i]
        rows.append(vectors[i] * norms[others].prod() - true[i] * overlaps[others].prod())
    return torch.stack(rows) / n**3


def test_update_is_gradient_descent_on_half_the_mean_squared_error():
    problem = ToyProblem.sample(dim=3, seed=0)
    rows = train(problem, clamped=[], lr=0.7, iterations=2)
    a, b, c = problem.init
    by_hand = 0.5 * sum((problem.true[0][i] * problem.true[1][j] * problem.true[2][k] - a[i] * b[j] * c[k]) ** 2
                        for i in range(3) for j in range(3) for k in range(3)) / 27
    assert rows.loss[0] == pytest.approx(by_hand.item(), rel=1e-12)
    stepped = problem.init - 0.7 * closed_form_gradient(problem.init, problem.true)
    assert rows.loss[1] == pytest.approx(loss(stepped, problem.target).item(), rel=1e-12)


def test_clamping_b_and_c_gives_the_geometric_decay_of_linear_least_squares():
    """With b = b*, c = c*: a - a* shrinks by (1 - |b*|²|c*|²·lr/dim³) per step, so
    loss_t = ½·|b*|²|c*|²/dim³ · |a_0 - a*|² · (1 - lr·|b*|²|c*|²/dim³)^(2t)."""
    dim, lr = 6, 0.5
    problem = ToyProblem.sample(dim, seed=3)
    rows = train(problem, clamped=[1, 2], lr=lr, iterations=60)
    curvature = (problem.true[1] ** 2).sum() * (problem.true[2] ** 2).sum() / dim**3
    shrink = (1 - lr * curvature) ** torch.arange(60, dtype=torch.float64)[:, None]
    a = problem.true[0] + shrink * (problem.init[0] - problem.true[0])  # [iteration, dim]
    expected = 0.5 * curvature * ((a - problem.true[0]) ** 2).sum(1)
    assert rows.loss.to_numpy() == pytest.approx(expected.numpy(), rel=1e-9)
    # the second progress measure (b, c true; a or -a, whichever fits better)
    flipped = 0.5 * curvature * ((a + problem.true[0]) ** 2).sum(1)
    assert rows.a_loss_true_bc.to_numpy() == pytest.approx(torch.minimum(expected, flipped).numpy(), rel=1e-9)
    cos = (a @ problem.true[0]) / (a.norm(dim=1) * problem.true[0].norm())
    assert rows.a_cos_error.to_numpy() == pytest.approx((1 - cos**2).numpy(), rel=1e-9, abs=1e-15)


def test_clamping_shortens_then_removes_the_plateau():
    table = run_conditions(["none", "c", "bc"], dim=20, lr=1.0, iterations=1000, seed=17)
    fits = fit_iterations(table)
    assert fits["none"] > fits["c"] > fits["bc"]
    none = table[table.condition == "none"].set_index("iteration").loss
    # unclamped: a long plateau (loss flat within 5% over hundreds of steps), then a sudden drop
    assert fits["none"] > 500 and abs(none[500] - none[200]) < 0.05 * none[200]
    assert none[fits["none"] - 200] > 0.5 * none[300]  # still near the plateau 200 steps before the fit
    # b, c clamped: the loss decays from the first step (no plateau)
    both = table[table.condition == "bc"].loss.to_numpy()
    assert (both[1:] < both[:-1]).all()
    assert table.groupby("condition").a_cos_error.last().max() < 1e-6


def test_toy_command_writes_table_figure_and_settings(outputs_root):
    args = ["toy", "--dim", "5", "--iterations", "40", "--conditions", "none,bc", "--out", str(outputs_root / "t")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(outputs_root / "t" / "toy.parquet")
    assert len(table) == 80 and list(table.condition.unique()) == ["none", "bc"]
    assert (outputs_root / "t" / "toy.png").read_bytes().startswith(b"\x89PNG")
    settings = json.loads((outputs_root / "t" / "toy.json").read_text())
    assert settings["dim"] == 5 and set(settings["fit_iteration"]) == {"none", "bc"}
    again = CliRunner().invoke(app, [*args[:-1], str(outputs_root / "u")])
    assert again.exit_code == 0
    assert pd.read_parquet(outputs_root / "u" / "toy.parquet").equals(table)  # deterministic


@pytest.mark.parametrize("bad", [["--conditions", "none,x"], ["--conditions", "cc"], ["--conditions", "c,c"],
                                 ["--dim", "0"], ["--lr", "-1"], ["--iterations", "0"]])
def test_bad_toy_input_is_one_line_and_writes_nothing(outputs_root, bad):
    result = CliRunner().invoke(app, ["toy", *bad])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not any(outputs_root.iterdir())


def test_toy_never_writes_into_a_folder_holding_files(outputs_root):
    (outputs_root / "t").mkdir()
    (outputs_root / "t" / "mine.txt").write_text("keep")
    result = CliRunner().invoke(app, ["toy", "--dim", "3", "--iterations", "5", "--out", str(outputs_root / "t")])
    assert result.exit_code == 2
    assert sorted(p.name for p in (outputs_root / "t").iterdir()) == ["mine.txt"]


def test_toy_default_folders_never_collide(outputs_root):
    folders = {write_toy(run_conditions(["bc"], 3, 1.0, 3, 0), None, {"dim": 3, "lr": 1.0, "seed": 0})[0] for _ in range(2)}
    assert len(folders) == 2 and all(f.parent == outputs_root / "toy" for f in folders)
