"""Search strategies: a contract suite that every registered strategy joins, plus per-strategy checks.

The toy problems have a known structure: accuracy ``1 - sum(w (1 - x)^2) / sum(w)`` with distinct layer
weights ``w``, cost ``sum(c x) / sum(c)`` with distinct layer costs ``c``, keep ratios on a 1/16 grid.
The optimum prunes the cheap-to-lose, expensive-to-keep layers (large ``c / w``) most.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune.errors import AutopruneError
from autoprune.search import (
    STRATEGIES,
    TOLERANCE,
    Fitness,
    Problem,
    SimulatedAnnealing,
    Strategy,
    create_strategy,
    replay,
    run_search,
    strategy_names,
)

D = 6
WEIGHTS = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
COSTS = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
LOWER = np.full(D, 2 / 16)
UPPER = np.ones(D)
MAX_COST = 0.5
MAX_DROP = 0.05
MODES = ("macs", "drop")
SEEDS = range(5)


def snap(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=float) * 16) / 16, LOWER, UPPER)


def cost(x: np.ndarray) -> float:
    return float(COSTS @ x / COSTS.sum())


def accuracy(x: np.ndarray) -> float:
    return float(1.0 - WEIGHTS @ (1.0 - x) ** 2 / WEIGHTS.sum())


def evaluate(x: np.ndarray) -> Fitness:
    return Fitness(accuracy(x), cost(x), cost(x))


def make_problem(mode: str, **overrides: object) -> Problem:
    target = {"max_cost": MAX_COST} if mode == "macs" else {"max_drop": MAX_DROP}
    fields = {"lower": LOWER, "upper": UPPER, "cost": cost, "snap": snap, "base_accuracy": 1.0, **target}
    return Problem(**{**fields, **overrides})  # type: ignore[arg-type]


# Channel scores consistent with the toy: under one global threshold t, layer i keeps the fraction
# 1 - t c_i / (2 w_i) of its channels, which is exactly the family of optimal keep vectors.
SCORES = tuple(np.linspace(0.0, 2.0 * w / c, 64) for w, c in zip(WEIGHTS, COSTS, strict=True))

# Options for the toy problems (a strategy not listed runs with its defaults): required options, and
# schedules sized to the comparison budget.
OPTIONS: dict[str, dict[str, object]] = {
    "threshold": {"scores": SCORES, "rule": "global"},
    "pso": {"iterations": 15},
    "sa": {"iterations": 149},
    "ssa": {"iterations": 6},
}
BUDGET = 150
# The greedy walk from the unpruned network needs about 200 evaluations to reach MAX_COST.
BUDGETS = {"greedy": 240}

# Option values each strategy must refuse (an unknown option name is checked for every strategy).
BAD_OPTIONS: dict[str, list[dict[str, object]]] = {
    "greedy": [{"step": 0}, {"step": 1.5}, {"step": "big"}],
    "pso": [{"particles": 0}, {"iterations": 0}, {"max_velocity": 0.0}, {"c1": -1.0}, {"inertia_start": 3}],
    "sa": [{"t0": -1.0}, {"alpha": 0.0}, {"alpha": 1.5}, {"iterations": 0}, {"grid": 1}, {"swap": 2.0}],
    "ssa": [{"population": 1}, {"producers": 0.0}, {"vigilant": -0.1}, {"safety": 0.2}, {"iterations": 2.5}],
    "random": [{"batch": 0}, {"batch": True}],
    "uniform": [{"steps": 0}],
    "threshold": [{"scores": None}, {"scores": SCORES[:2]}, {"rule": "median"}, {"probes": -1}, {"steps": 0}],
}


def build(name: str, problem: Problem, seed: int = 0, **extra: object) -> Strategy:
    return create_strategy(name, problem, seed=seed, **{**OPTIONS.get(name, {}), **extra})


def budget_for(name: str) -> int:
    return BUDGETS.get(name, BUDGET)


def record(strategy: Strategy, budget: int) -> tuple[list[np.ndarray], object]:
    """Run a search and return every evaluated candidate, in order, and the result."""
    seen: list[np.ndarray] = []
    result = run_search(strategy, evaluate, budget=budget, on_result=lambda x, f, s: seen.append(x))
    return seen, result


def best_or_floor(score: float | None) -> float:
    return -10.0 if score is None else score


names = pytest.mark.parametrize("name", strategy_names())
modes = pytest.mark.parametrize("mode", MODES)


# --- the registry -----------------------------------------------------------------------------------


def test_registry_holds_every_strategy() -> None:
    assert strategy_names() == sorted(STRATEGIES)
    assert {"greedy", "pso", "sa", "ssa", "random", "uniform", "threshold"} <= set(strategy_names())


def test_unknown_strategy_names_the_valid_ones() -> None:
    with pytest.raises(AutopruneError, match="unknown strategy 'annealing'.*greedy"):
        create_strategy("annealing", make_problem("macs"))


def test_search_package_does_not_import_torch() -> None:
    """The search modules import numpy only (the parent package, which loads models, is stubbed out)."""
    import autoprune

    code = (
        "import sys, types\n"
        "package = types.ModuleType('autoprune')\n"
        f"package.__path__ = {list(autoprune.__path__)!r}\n"
        "sys.modules['autoprune'] = package\n"
        "import autoprune.search\n"
        "assert len(autoprune.search.strategy_names()) >= 7\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the contract: every registered strategy ---------------------------------------------------------


@names
@modes
def test_asks_are_in_bounds_snapped_and_feasible(name: str, mode: str) -> None:
    problem = make_problem(mode)
    strategy = build(name, problem, seed=1)
    seen, result = record(strategy, budget_for(name))
    assert seen, "the strategy asked nothing"
    for x in seen:
        assert x.shape == (D,)
        assert np.all(x >= LOWER) and np.all(x <= UPPER)
        np.testing.assert_array_equal(snap(x), x)
        if mode == "macs" and strategy.feasible_asks:
            assert cost(x) <= MAX_COST + TOLERANCE
    assert result.best_x is not None, "no feasible candidate found"
    assert problem.feasible(result.best_x, evaluate(result.best_x))
    if mode == "macs" and not strategy.feasible_asks:
        assert strategy.done, "a path strategy must end (feasible) within the budget"


@names
@modes
def test_same_seed_gives_the_same_search(name: str, mode: str) -> None:
    problem = make_problem(mode)
    first, result_1 = record(build(name, problem, seed=3), 60)
    second, result_2 = record(build(name, problem, seed=3), 60)
    np.testing.assert_array_equal(np.array(first), np.array(second))
    assert result_1.best_score == result_2.best_score


@names
def test_seeds_differ_exactly_for_stochastic_strategies(name: str) -> None:
    problem = make_problem("macs")
    first, _ = record(build(name, problem, seed=0), 40)
    second, _ = record(build(name, problem, seed=1), 40)
    same = len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert same is not STRATEGIES[name].stochastic


@names
@modes
def test_beats_random_search_at_the_same_budget(name: str, mode: str) -> None:
    if name == "random":
        pytest.skip("random search is the baseline itself")
    problem = make_problem(mode)
    ours, theirs = [], []
    for seed in SEEDS:
        result = run_search(build(name, problem, seed=seed), evaluate, budget=budget_for(name))
        baseline = run_search(create_strategy("random", problem, seed=seed), evaluate, budget=result.evaluations)
        ours.append(best_or_floor(result.best_score))
        theirs.append(best_or_floor(baseline.best_score))
    assert np.mean(ours) >= np.mean(theirs), f"{name}: {np.mean(ours):.4f} < random {np.mean(theirs):.4f}"


@names
def test_a_told_prefix_resumes_exactly(name: str) -> None:
    """Telling part of a batch (the budget ran out) then the rest gives the uninterrupted search."""
    problem = make_problem("macs")
    reference, _ = record(build(name, problem, seed=2), 50)

    strategy = build(name, problem, seed=2)
    seen: list[np.ndarray] = []
    cut = True
    while len(seen) < 50 and not strategy.done:
        xs = strategy.ask()
        if not xs:
            break
        xs = xs[: 50 - len(seen)]
        if cut and len(xs) >= 2:
            cut = False
            strategy.tell([], [])  # nothing evaluated: a no-op
            head = xs[: len(xs) // 2]
            strategy.tell(head, [evaluate(x) for x in head])
            seen.extend(head)
            xs = strategy.ask()[: 50 - len(seen)]
            np.testing.assert_array_equal(np.array(xs), np.array(reference[len(seen) : len(seen) + len(xs)]))
        strategy.tell(xs, [evaluate(x) for x in xs])
        seen.extend(xs)
    np.testing.assert_array_equal(np.array(seen), np.array(reference))


@names
def test_run_search_split_over_two_budgets_matches_one_run(name: str) -> None:
    problem = make_problem("drop")
    whole = run_search(build(name, problem, seed=4), evaluate, budget=45)
    strategy = build(name, problem, seed=4)
    first = run_search(strategy, evaluate, budget=13)
    second = run_search(strategy, evaluate, budget=32)
    split = [x for x, _, _ in first.history + second.history]
    np.testing.assert_array_equal(np.array(split), np.array([x for x, _, _ in whole.history]))
    assert second.best_score == whole.best_score


@names
@modes
def test_replayed_history_resumes_the_search(name: str, mode: str) -> None:
    problem = make_problem(mode)
    whole = run_search(build(name, problem, seed=6), evaluate, budget=60)
    interrupted = run_search(build(name, problem, seed=6), evaluate, budget=37)
    resumed = build(name, problem, seed=6)
    assert replay(resumed, interrupted.history) == interrupted.evaluations
    rest = run_search(resumed, evaluate, budget=60 - interrupted.evaluations)
    combined = [x for x, _, _ in interrupted.history + rest.history]
    np.testing.assert_array_equal(np.array(combined), np.array([x for x, _, _ in whole.history]))
    assert rest.best_score == whole.best_score


def test_replay_refuses_a_foreign_history() -> None:
    problem = make_problem("macs")
    history = run_search(create_strategy("random", problem, seed=1), evaluate, budget=8).history
    with pytest.raises(AutopruneError, match="was asked"):
        replay(create_strategy("random", problem, seed=2), history)


@names
def test_bad_options_are_refused(name: str) -> None:
    problem = make_problem("macs")
    with pytest.raises(AutopruneError, match="unknown option.*bogus"):
        build(name, problem, bogus=1)
    with pytest.raises(AutopruneError, match="seed"):
        build(name, problem, seed=-1)
    for bad in BAD_OPTIONS.get(name, []):
        with pytest.raises(AutopruneError):
            build(name, problem, **bad)


@names
def test_defaults_are_documented_options(name: str) -> None:
    cls = STRATEGIES[name]
    assert cls.__doc__ and len(cls.__doc__) > 200
    for option in cls.defaults():
        assert option in (cls.__init__.__doc__ or ""), f"{name}: option {option} undocumented"


@names
def test_tell_refuses_what_was_not_asked(name: str) -> None:
    strategy = build(name, make_problem("macs"))
    with pytest.raises(AutopruneError, match="without a pending ask"):
        strategy.tell([UPPER], [evaluate(UPPER)])
    xs = strategy.ask()
    assert [x.tolist() for x in strategy.ask()] == [x.tolist() for x in xs], "ask() before tell() must repeat"
    wrong = xs[0] + 0.25
    with pytest.raises(AutopruneError, match="was asked"):
        strategy.tell([wrong], [evaluate(wrong)])
    with pytest.raises(AutopruneError, match="results"):
        strategy.tell(xs, [evaluate(x) for x in xs] * 2)


# --- the problem --------------------------------------------------------------------------------------


def test_problem_needs_exactly_one_target() -> None:
    with pytest.raises(AutopruneError, match="exactly one target"):
        make_problem("macs", max_drop=0.01)
    with pytest.raises(AutopruneError, match="exactly one target"):
        make_problem("macs", max_cost=None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lower": np.full(D, 0.5), "upper": np.full(D, 0.25)}, "lower exceeds upper"),
        ({"lower": np.full(D - 1, 0.125)}, "differ in length"),
        ({"max_cost": 0.05}, "unreachable.*minimum widths"),
        ({"max_cost": -0.1}, "max_cost"),
        ({"choices": tuple(np.array([1.0, 0.5]) for _ in range(D))}, "sorted"),
        ({"choices": (np.array([0.5, 1.0]),)}, "one array per dimension"),
        ({"upper": np.full(D, np.nan)}, "finite"),
    ],
)
def test_problem_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(AutopruneError, match=message):
        make_problem("macs", **overrides)


def test_drop_target_tolerates_float_rounding() -> None:
    problem = make_problem("drop", base_accuracy=0.9, max_drop=0.01)
    assert problem.feasible(UPPER, Fitness(0.89, 1.0, 1.0))
    assert not problem.feasible(UPPER, Fitness(0.8899, 1.0, 1.0))


@modes
def test_every_feasible_score_beats_every_infeasible_one(mode: str) -> None:
    problem = make_problem(mode)
    rng = np.random.default_rng(0)
    feasible, infeasible = [], []
    for _ in range(300):
        x = snap(LOWER + rng.random(D) * (UPPER - LOWER))
        fitness = Fitness(float(rng.random()), cost(x), 0.0)
        (feasible if problem.feasible(x, fitness) else infeasible).append(problem.score(x, fitness))
    assert feasible and infeasible
    assert min(feasible) > max(infeasible)


def test_penalty_is_subtracted_from_the_score() -> None:
    problem = make_problem("macs", penalty=lambda x: 0.1 * float(np.sum(x)))
    x = snap(np.full(D, 0.25))
    assert problem.score(x, Fitness(0.8, 0.0, 0.0)) == pytest.approx(0.8 - 0.1 * float(np.sum(x)))


keep_vectors = st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=D, max_size=D).map(np.array)


@settings(max_examples=150, deadline=None)
@given(x=keep_vectors, max_cost=st.floats(0.13, 1.0))
def test_repair_is_feasible_in_bounds_and_snapped(x: np.ndarray, max_cost: float) -> None:
    problem = make_problem("macs", max_cost=max_cost)
    for repaired in (problem.repair(x), problem.place(x), problem.fill(x), problem.place(x, problem.grid(5))):
        assert cost(repaired) <= max_cost + TOLERANCE
        assert np.all(repaired >= LOWER) and np.all(repaired <= UPPER)
        np.testing.assert_array_equal(snap(repaired), repaired)
    repaired = problem.repair(x)
    np.testing.assert_array_equal(problem.repair(repaired), repaired)
    if cost(snap(np.clip(x, LOWER, UPPER))) <= max_cost:
        np.testing.assert_array_equal(repaired, snap(np.clip(x, LOWER, UPPER)))
    else:  # pulled toward lower, never pushed out
        assert np.all(repaired <= snap(np.clip(x, LOWER, UPPER)))


def test_repair_is_the_identity_clip_in_drop_mode() -> None:
    problem = make_problem("drop")
    np.testing.assert_array_equal(problem.repair(np.full(D, 2.0)), UPPER)


def test_fill_uses_the_cost_ceiling() -> None:
    problem = make_problem("macs")
    filled = problem.fill(snap(np.full(D, 0.25)))
    assert cost(filled) <= MAX_COST + TOLERANCE
    assert cost(filled) > MAX_COST - 1 / 16


# --- each strategy's own behaviour -----------------------------------------------------------------


def test_greedy_takes_the_move_with_the_best_saving_per_accuracy_lost() -> None:
    problem = make_problem("macs", max_cost=0.3)
    strategy = create_strategy("greedy", problem)
    [start] = strategy.ask()
    np.testing.assert_array_equal(start, UPPER)
    strategy.tell([start], [Fitness(0.9, 1.0, 1.0)])
    moves = strategy.ask()
    assert len(moves) == D
    for i, move in enumerate(moves):
        assert move[i] == 15 / 16 and np.sum(move != start) == 1
    # Dimension 5 saves the most but loses 0.06; dimension 2 saves less for a loss of only 0.001.
    losses = [0.01, 0.02, 0.001, 0.05, 0.05, 0.06]
    strategy.tell(moves, [Fitness(0.9 - loss, 0.0, 0.0) for loss in losses])
    following = strategy.ask()
    np.testing.assert_array_equal(strategy.current, moves[2])
    assert all(np.sum(x != moves[2]) == 1 for x in following)


def test_greedy_prefers_free_moves_by_saving() -> None:
    strategy = create_strategy("greedy", make_problem("macs", max_cost=0.3))
    [start] = strategy.ask()
    strategy.tell([start], [Fitness(0.9, 1.0, 1.0)])
    moves = strategy.ask()
    strategy.tell(moves, [Fitness(0.9, 0.0, 0.0)] * D)  # every move is free: the largest saving wins
    np.testing.assert_array_equal(strategy.current, moves[int(np.argmax(COSTS))])


def test_greedy_in_drop_mode_stops_at_the_tolerance() -> None:
    problem = make_problem("drop")
    strategy = create_strategy("greedy", problem)
    result = run_search(strategy, evaluate, budget=10_000)
    assert strategy.done
    current = strategy.current
    assert 1.0 - accuracy(current) <= MAX_DROP
    for i in np.flatnonzero(current > LOWER):  # every further step would break the tolerance
        step = current.copy()
        step[i] -= 1 / 16
        assert 1.0 - accuracy(step) > MAX_DROP
    assert result.best_x is not None and 1.0 - accuracy(result.best_x) <= MAX_DROP


def test_uniform_keeps_one_ratio_everywhere() -> None:
    problem = make_problem("macs")
    strategy = create_strategy("uniform", problem)
    [x] = strategy.ask()
    assert np.all(x == x[0])
    assert cost(x) <= MAX_COST and cost(snap(x + 1 / 16)) > MAX_COST
    result = run_search(create_strategy("uniform", problem), evaluate, budget=100)
    assert result.evaluations == 1


def test_uniform_in_drop_mode_bisects_with_few_evaluations() -> None:
    result = run_search(create_strategy("uniform", make_problem("drop"), steps=8), evaluate, budget=100)
    assert result.evaluations <= 9
    assert result.best_x is not None and np.all(result.best_x == result.best_x[0])
    ratio = result.best_x[0]
    assert 1.0 - accuracy(result.best_x) <= MAX_DROP < 1.0 - accuracy(snap(np.full(D, ratio - 1 / 16)))


def _anneal(t0: float, mode: str = "macs") -> SimulatedAnnealing:
    strategy = create_strategy("sa", make_problem(mode), seed=5, t0=t0, alpha=1.0, iterations=80)
    assert isinstance(strategy, SimulatedAnnealing)
    scores = []
    while not strategy.done:
        xs = strategy.ask()
        strategy.tell(xs, [evaluate(x) for x in xs])
        scores.append(strategy.current[1])
    strategy.trace = scores  # type: ignore[attr-defined]
    return strategy


@modes
def test_sa_accepts_worse_moves_when_hot_and_never_when_cold(mode: str) -> None:
    hot = _anneal(10.0, mode)
    assert hot.accepted_worse > 0
    assert any(b < a for a, b in zip(hot.trace, hot.trace[1:], strict=False))  # type: ignore[attr-defined]
    cold = _anneal(0.0, mode)
    assert cold.accepted_worse == 0
    assert all(b >= a for a, b in zip(cold.trace, cold.trace[1:], strict=False))  # type: ignore[attr-defined]


def test_sa_starts_at_the_largest_choices_and_includes_the_penalty() -> None:
    choices = tuple(np.array([0.25, 0.5, 0.75, 1.0]) for _ in range(D))
    problem = make_problem("drop", choices=choices, penalty=lambda x: 0.5)
    strategy = create_strategy("sa", problem)
    [first] = strategy.ask()
    np.testing.assert_array_equal(first, UPPER)
    strategy.tell([first], [evaluate(first)])
    assert strategy.current[1] == pytest.approx(1.0 - 1.0 - 0.5)


@modes
def test_ssa_keeps_to_the_constraint_set(mode: str) -> None:
    allowed = np.array([0.25, 0.5, 0.75, 1.0])
    problem = make_problem(mode, choices=tuple(allowed for _ in range(D)))
    seen, result = record(create_strategy("ssa", problem, seed=7, iterations=5), 200)
    assert len(seen) == 20 + 5 * 22
    assert all(np.all(np.isin(x, allowed)) for x in seen)
    assert result.best_x is not None


def test_pso_runs_its_iterations_then_stops() -> None:
    strategy = create_strategy("pso", make_problem("macs"), particles=4, iterations=3)
    result = run_search(strategy, evaluate, budget=100)
    assert strategy.done and result.evaluations == 12
    assert strategy.inertia(0) == pytest.approx(0.9) and strategy.inertia(2) == pytest.approx(0.4)


def test_random_never_finishes_by_itself() -> None:
    strategy = create_strategy("random", make_problem("macs"), batch=3)
    result = run_search(strategy, evaluate, budget=10)
    assert result.evaluations == 10 and not strategy.done


def _threshold_keep(rule: str, scores: tuple[np.ndarray, ...]) -> np.ndarray:
    strategy = create_strategy("threshold", make_problem("macs"), scores=scores, rule=rule, probes=0)
    [x] = strategy.ask()
    return x


def test_threshold_rules_global_ranks_across_layers_adaptive_within_each() -> None:
    rng = np.random.default_rng(0)
    scores = tuple(rng.random(64) for _ in range(D))
    louder = (scores[0] * 100.0, *scores[1:])
    assert _threshold_keep("global", louder)[0] > _threshold_keep("global", scores)[0]
    np.testing.assert_array_equal(_threshold_keep("adaptive", louder), _threshold_keep("adaptive", scores))


def test_threshold_macs_mode_probes_beyond_the_bisection() -> None:
    problem = make_problem("macs")
    strategy = create_strategy("threshold", problem, scores=SCORES, rule="global", probes=3)
    batch = strategy.ask()
    assert len(batch) == 4
    costs = [cost(x) for x in batch]
    assert costs == sorted(costs, reverse=True) and costs[0] <= MAX_COST
    assert len({x.tobytes() for x in batch}) == 4
    index = next(i for i, x in enumerate(strategy.path) if np.array_equal(x, batch[0]))
    assert index == 0 or cost(strategy.path[index - 1]) > MAX_COST


def test_threshold_drop_mode_bisects_with_evaluations() -> None:
    strategy = create_strategy("threshold", make_problem("drop"), scores=SCORES, rule="global", steps=6)
    result = run_search(strategy, evaluate, budget=100)
    assert result.evaluations <= 7 and strategy.done
    assert result.best_x is not None and 1.0 - accuracy(result.best_x) <= MAX_DROP


# --- the loop ---------------------------------------------------------------------------------------


def test_run_search_respects_the_budget_and_reports_every_result() -> None:
    problem = make_problem("macs")
    calls: list[tuple[np.ndarray, Fitness, float]] = []
    strategy = create_strategy("pso", problem, particles=7)
    result = run_search(strategy, evaluate, budget=17, on_result=lambda x, f, s: calls.append((x, f, s)))
    assert result.evaluations == len(result.history) == len(calls) == 17
    for (x, fitness, score), (cx, _, cs) in zip(result.history, calls, strict=True):
        assert score == cs == problem.score(x, fitness)
        np.testing.assert_array_equal(x, cx)
    best = strategy.best
    assert best is not None and result.best_score == best[1]
    assert result.best_score == max(s for x, f, s in result.history if problem.feasible(x, f))


def test_run_search_validates_budget_and_results() -> None:
    problem = make_problem("macs")
    assert run_search(create_strategy("random", problem), evaluate, budget=0).evaluations == 0
    with pytest.raises(AutopruneError, match="budget"):
        run_search(create_strategy("random", problem), evaluate, budget=-1)

    def bad(x: np.ndarray) -> Fitness:
        return 0.5  # type: ignore[return-value]

    with pytest.raises(AutopruneError, match="Fitness"):
        run_search(create_strategy("random", problem), bad, budget=3)
