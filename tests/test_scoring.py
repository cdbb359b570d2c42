"""Candidate scores and the multi-fidelity selection (:mod:`autoprune.engine.scoring`).

Tiny models trained here for a second on a learnable toy task: every registered score is selectable through
``autoprune.prune(score=...)`` and the CLI; an unknown one is the registry's one-line error; a network
without BatchNorm is really adapted by the fine-tune score; the KL score is 1.0 (zero divergence) for the
unpruned network and ranks a superset of channels above a subset on a constructed network where that must
hold; successive halving fine-tunes only the top structures and can overturn the cheap score's choice;
the same seed gives the same run; the scores never read the test loader.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import (  # noqa: F401  (no_figures, one_thread, restore_subnormals: autouse fixtures)
    assert_one_line_error,
    no_figures,
    one_thread,
    restore_subnormals,
    run_cli,
    trained_base,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.engine import prune as engine
from autoprune.engine import scoring
from autoprune.engine.batches import take
from autoprune.engine.evaluate import Evaluator
from autoprune.engine.scoring import (
    AUTO_SELECT_TOP,
    SCORES,
    SELECT_ETA,
    Measurement,
    ScoreData,
    create_score,
    measure,
    selection_score,
    selection_size,
    selection_steps,
    successive_halving,
)
from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError
from autoprune.search import Problem

CLASSES, SIZE = 3, 12
FAST = {"latency_repeats": 2, "latency_batch": 4, "calibration_samples": 64}
RUN = {"method": "random", "macs_reduction": 0.6, "budget": 4, "finetune": None, "seed": 0, **FAST}
QUICK_FINETUNE = {"steps": 4, "samples": 64}


def toy_data(n: int, seed: int) -> TensorDataset:
    """Noise images whose label is the channel raised in them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) + 0.3 * F.one_hot(y, 3).float()[:, :, None, None]
    return TensorDataset(x, y)


def with_bn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, CLASSES))


def without_bn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 16), nn.ReLU(),
                         nn.Linear(16, CLASSES))


def trained(model: nn.Module, data: TensorDataset, epochs: int = 6) -> nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def case():
    train, val = toy_data(192, 1), toy_data(96, 2)
    return {"bn": trained(with_bn(), train), "plain": trained(without_bn(), train, epochs=15),
            "train": DataLoader(train, batch_size=32), "val": DataLoader(val, batch_size=48),
            "test": DataLoader(toy_data(96, 3), batch_size=48), "example": train.tensors[0][:2]}


def prune(case, model: str = "bn", **settings):
    return autoprune.prune(case[model], case["example"], train_loader=case["train"], val_loader=case["val"],
                           **{**RUN, **settings})


def evaluator_for(case, model: str, score: str, **options) -> Evaluator:
    net = case[model]
    space = PruningSpace(net, case["example"])
    channel_scores = [torch.arange(g.channels, dtype=torch.float32) for g in space.groups]
    val = list(case["val"])
    train = list(case["train"])
    return Evaluator(net, space, channel_scores, val, [x for x, _ in train], score=create_score(score, options),
                     train=train, seed=0)


# ---- registration and selection ------------------------------------------------------------------------

def test_the_scores_are_registered():
    assert SCORES.names() == ["auto", "bn", "finetune", "kl", "loss", "none"]


@pytest.mark.parametrize("name", ["none", "bn", "loss", "kl", "finetune", "auto"])
def test_every_score_is_selectable_through_prune(case, name):
    options = {"score_options": QUICK_FINETUNE} if name == "finetune" else {}
    result = prune(case, score=name, **options)
    assert result.search.score == name and result.config.score == name
    assert result.search.notes["score"]["name"] == ("kl" if name == "auto" else name)  # auto: BatchNorm -> kl
    values = [row.value for row in result.history]
    if name in ("loss", "kl", "finetune", "auto"):  # ranked by exp(-loss) / exp(-KL): a value beside the accuracy
        assert all(v is not None and 0 < v <= 1 for v in values)
        assert [row.score for row in result.history] == pytest.approx(values)
    else:
        assert values == [None] * len(values)
        assert [row.score for row in result.history] == [row.accuracy for row in result.history]


def test_unknown_score_is_the_registry_one_line_error(case):
    with pytest.raises(AutopruneError) as info:
        prune(case, score="eagle")
    assert str(info.value) == "unknown score 'eagle'; valid scores: auto, bn, finetune, kl, loss, none"
    with pytest.raises(AutopruneError, match="unknown option 'stepz' for score 'finetune'; valid options: "):
        prune(case, score="finetune", score_options={"stepz": 3})


def test_bad_selection_settings_are_refused(case):
    with pytest.raises(AutopruneError, match="select_top=-1"):
        prune(case, select_top=-1)
    with pytest.raises(AutopruneError, match="select_steps=0"):
        prune(case, select_steps=0)
    with pytest.raises(AutopruneError, match="select_samples=0"):
        prune(case, select_samples=0)


def test_scores_that_read_logits_refuse_a_score_fn(case):
    with pytest.raises(AutopruneError, match="score 'kl' needs a classifier's logits"):
        prune(case, score="kl", score_fn=lambda model: 0.5)


def test_auto_is_kl_with_batchnorm_finetune_without_and_bn_with_a_score_fn(case):
    auto = create_score("auto", {"steps": 7})
    assert auto.resolve(case["bn"]).name == "kl"
    tuned = auto.resolve(case["plain"])
    assert tuned.name == "finetune" and tuned.steps == 7 and tuned.adapts
    assert auto.resolve(case["plain"], score_fn=lambda model: 0.5).name == "bn"
    result = prune(case, "plain", score="auto", score_options={"steps": 3})
    assert result.search.notes["score"] == {**tuned.describe(), "steps": 3}
    assert all(row.value is not None for row in result.history)
    with_fn = prune(case, "plain", score="auto", score_fn=lambda model: 0.5)  # no error: auto falls back to bn
    assert with_fn.search.notes["score"]["name"] == "bn"


def test_auto_without_training_data_ranks_by_accuracy_instead_of_failing(case):
    assert create_score("auto").resolve(case["plain"], trainable=False).name == "bn"
    result = autoprune.prune(case["plain"], case["example"], val_loader=case["val"], score="auto", **RUN)
    assert result.search.notes["score"]["name"] == "bn"
    with pytest.raises(AutopruneError, match="fine-tunes every candidate on training data"):
        autoprune.prune(case["plain"], case["example"], val_loader=case["val"], score="finetune", **RUN)


def test_finetune_score_without_training_data_says_so(case):
    with pytest.raises(AutopruneError, match="fine-tunes every candidate on training data: pass train_loader="):
        autoprune.prune(case["bn"], case["example"], val_loader=case["val"], score="finetune", **RUN)


@pytest.mark.slow
def test_the_cli_takes_every_score_and_refuses_unknown_ones(tmp_path_factory, tmp_path, capsys):
    base = trained_base(tmp_path_factory)
    common = [base, "--dataset", "synthetic", "--method", "random", "--budget", "2", "--macs-reduction", "0.5",
              "--finetune-epochs", "0", "--latency-batch", "4", "--latency-repeats", "1", "--quiet"]
    for name in SCORES.names():
        code, _, err = run_cli(["prune", *common, "--score", name, "--out", tmp_path / name], capsys)
        assert code == 0, err
        report = (tmp_path / name / "report.json").read_text()
        assert f'"score": "{name}"' in report
    code, _, err = run_cli(["prune", *common, "--score", "eagle", "--out", tmp_path / "bad"], capsys)
    assert code != 0
    assert_one_line_error(err, "unknown score 'eagle'; valid scores: auto, bn, finetune, kl, loss, none")


def test_the_cli_takes_the_selection_settings(tmp_path_factory, tmp_path, capsys):
    base = trained_base(tmp_path_factory)
    common = [base, "--dataset", "synthetic", "--method", "random", "--budget", "3", "--macs-reduction", "0.5",
              "--finetune-epochs", "0", "--latency-batch", "4", "--latency-repeats", "1", "--quiet"]
    code, _, err = run_cli(["prune", *common, "--score", "bn", "--select-top", "2", "--select-steps", "3",
                            "--select-samples", "100", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert (report["config"]["select_top"], report["config"]["select_steps"]) == (2, 3)
    assert report["config"]["select_samples"] == 100
    rungs = report["search"]["selection"]["rungs"]
    assert rungs[0]["steps"] == 3 and rungs[0]["structures"] >= 2  # the 2 best, and uniform unless among them
    steps = "/".join(str(r["steps"]) for r in rungs)
    said = f"then a selection among {rungs[0]['structures']} structures (fine-tuned {steps} steps"
    assert said in (tmp_path / "s" / "report.md").read_text()  # the HTML report says it with the same function


# ---- what the scores measure ---------------------------------------------------------------------------

def test_a_network_without_batchnorm_is_adapted_by_the_finetune_score(case):
    none = evaluator_for(case, "plain", "none")
    bn = evaluator_for(case, "plain", "bn")
    tuned = evaluator_for(case, "plain", "finetune", steps=12, metric="accuracy", samples=192)
    space = none.space
    keeps = [space.snap(np.full(len(space), r)) for r in (0.3, 0.5, 0.7)]
    raw = [none(k).accuracy for k in keeps]
    assert [bn(k).accuracy for k in keeps] == raw  # no BatchNorm: adaptive BN changes nothing
    adapted = [tuned(k).accuracy for k in keeps]
    assert adapted != raw
    assert np.mean(adapted) > np.mean(raw)  # the short fine-tune recovers accuracy the pruning lost


def test_kl_is_zero_for_the_unpruned_network_and_grows_with_what_is_removed():
    # logits = c * sum_j a_j relu(v . x): removing hidden units scales the logits by the fraction of the sum
    # kept, and KL(softmax(z) || softmax(s z)) decreases monotonically towards 0 as s -> 1 (convex, minimum at 1)
    torch.manual_seed(0)
    d, hidden = 6, 8
    v = torch.randn(d)
    net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))
    with torch.no_grad():
        scales = torch.linspace(0.5, 2.0, hidden)
        net[0].weight.copy_(scales[:, None] * v[None, :])
        net[0].bias.zero_()
        net[2].weight.copy_(torch.randn(CLASSES)[:, None].expand(CLASSES, hidden))
        net[2].bias.zero_()
    x = torch.randn(64, d)
    y = torch.randint(0, CLASSES, (64,))
    space = PruningSpace(net, x[:1])
    evaluator = Evaluator(net, space, [scales.clone()], [(x, y)], [], score="kl")
    assert evaluator(np.ones(1)).value == pytest.approx(1.0, abs=1e-6)  # KL 0: exp(-0)
    fewer, more = evaluator(np.array([0.25])), evaluator(np.array([0.75]))
    assert 0 < fewer.value < more.value < 1
    data = ScoreData(net, [(x, y)], [])
    assert measure(net, data, kl=True).kl == pytest.approx(0.0, abs=1e-6)


def test_loss_and_kl_values_are_in_the_unit_interval_and_ordered_like_the_raw_metric():
    m = Measurement(accuracy=0.5, loss=0.7, kl=0.2)
    assert m.value("accuracy") == 0.5
    assert m.value("loss") == pytest.approx(math.exp(-0.7))
    assert m.value("kl") == pytest.approx(math.exp(-0.2))
    assert Measurement(0.1, math.inf, math.inf).value("kl") == 0.0
    assert Measurement(0.5, 0.7, 0.3).value("kl") < m.value("kl")


def test_masked_scoring_leaves_the_unpruned_teacher_intact(case):
    evaluator = evaluator_for(case, "bn", "kl")
    evaluator.physical = False
    before = {k: v.clone() for k, v in evaluator._model.state_dict().items()}
    evaluator(evaluator.space.snap(np.full(len(evaluator.space), 0.5)))
    after = evaluator._model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert evaluator(np.ones(len(evaluator.space))).value == pytest.approx(1.0, abs=1e-5)


# ---- multi-fidelity selection --------------------------------------------------------------------------

def test_successive_halving_can_overturn_the_cheap_choice_and_fine_tunes_only_the_candidates():
    candidates = [np.array([v]) for v in (0.9, 0.8, 0.7, 0.6, 0.5)]  # the cheap score's order: 0.9 best
    calls: list[tuple[float, int]] = []

    def score_at(keep: np.ndarray, steps: int) -> Measurement:
        calls.append((float(keep[0]), steps))
        # after fine-tuning, the cheap score's fourth structure is the best, increasingly so with more steps
        gap = abs(float(keep[0]) - 0.6)
        return Measurement(accuracy=1 - gap, kl=gap / steps)

    result = successive_halving(candidates, score_at, lambda keep: [int(100 * keep[0])], steps=5, eta=3)
    assert result.index == 3 and result.keep.tolist() == [0.6]
    assert [(r.steps, len(r.counts)) for r in result.rungs] == [(5, 5), (15, 2)]
    assert {keep for keep, _ in calls} <= {0.9, 0.8, 0.7, 0.6, 0.5}
    assert len(calls) == 5 + 2
    assert result.order[0] == 3 and sorted(result.order) == list(range(5))


def test_selection_in_the_engine_fine_tunes_the_top_k_and_its_pick_is_pruned(case, monkeypatch):
    measured: list[tuple[tuple[int, ...], int]] = []
    real = Evaluator.measure

    def spy(self, keep, score=None):
        if score is not None and score.adapts:  # a selection rung: favour the narrowest first layer
            measured.append((self.key(keep), score.steps))
            first = self.key(keep)[0]
            return Measurement(accuracy=0.9, kl=first / 100)
        return real(self, keep, score)

    monkeypatch.setattr(Evaluator, "measure", spy)
    result = prune(case, budget=8, score="kl", select_top=4, select_steps=2)
    structures = {counts for counts, steps in measured if steps == 2}
    distinct: list[tuple[int, ...]] = []
    for row in sorted(result.history, key=lambda row: -row.score):
        if row.counts not in distinct:
            distinct.append(row.counts)
    space = PruningSpace(case["bn"], case["example"])
    problem = Problem(lower=space.lower, upper=space.upper, cost=space.relative_macs, snap=space.snap,
                      base_accuracy=1.0, max_cost=1 - RUN["macs_reduction"])
    uniform = tuple(int(c) for c in space.counts(engine.uniform_candidate(problem)))
    assert structures == set(distinct[:4]) | {uniform}  # the top 4 by the cheap score, and the uniform one
    assert len(structures) >= 4 and {steps for _, steps in measured} == {2, 6}  # 4+ structures: two rungs
    best_cheap = max(result.history, key=lambda row: row.score)
    assert best_cheap.counts in structures
    narrowest = min(structures, key=lambda counts: (counts[0], structures_order(measured, counts)))
    assert tuple(w.after for w in result.widths) == narrowest  # the selection's pick, not the cheap score's
    assert result.search.selection is not None and len(result.search.selection["rungs"]) == 2


def structures_order(measured: list[tuple[tuple[int, ...], int]], counts: tuple[int, ...]) -> int:
    """Position of a structure among the first rung's (ties in the spy's value keep the earlier one)."""
    return [c for c, steps in measured if steps == measured[0][1]].index(counts)


def test_the_rungs_fine_tune_on_new_batches_while_the_cheap_score_sees_only_its_own_samples(case, monkeypatch):
    """The cheap fine-tune cycles its first ``samples`` (64: two batches of 32); the selection's rungs go on to
    the ``select_samples`` held (all 192 of the loader), so they see six batches, and the search itself is the
    same however many samples the selection holds."""
    used: list[tuple[int | None, int]] = []
    real = scoring.first_samples

    def spy(train, teacher, samples):
        batches = real(train, teacher, samples)
        used.append((samples, sum(len(targets) for _, targets, _ in batches)))
        return batches

    monkeypatch.setattr(scoring, "first_samples", spy)
    settings = {"score": "finetune", "score_options": QUICK_FINETUNE, "select_top": 2, "select_steps": 8}
    many = prune(case, "plain", **settings, select_samples=192)
    assert {(64, 64), (192, 192)} == set(used)  # the cheap score's 64 samples; the rungs' 192
    used.clear()
    few = prune(case, "plain", **settings, select_samples=64)
    assert set(used) == {(64, 64)}
    assert [(r.counts, r.value) for r in many.history] == [(r.counts, r.value) for r in few.history]


def test_first_samples_cuts_the_last_batch_and_its_teacher_logits():
    train = [(torch.zeros(32, 2), torch.arange(32)), (torch.ones(32, 2), torch.arange(32, 64))]
    teacher = [torch.zeros(32, CLASSES), torch.ones(32, CLASSES)]
    batches = scoring.first_samples(train, teacher, 40)
    assert [len(t) for _, t, _ in batches] == [32, 8] and batches[1][1].tolist() == list(range(32, 40))
    assert batches[1][0].shape == (8, 2) and batches[1][2].shape == (8, CLASSES)
    assert [len(t) for _, t, _ in scoring.first_samples(train, None, None)] == [32, 32]


def test_take_stops_at_a_memory_bound_but_not_below_its_minimum():
    loader = [(torch.zeros(32, 3, 12, 12), torch.zeros(32, dtype=torch.long))] * 10  # 55,296 bytes a batch
    def held(**bounds):
        return sum(len(t) for _, t in take(loader, 320, seed=0, key=0, device="cpu", **bounds))
    assert held() == 320
    assert held(max_bytes=100_000) == 64  # two batches reach the bound
    assert held(max_bytes=100_000, min_samples=200) == 224  # the cheap score's own samples are always held


def test_the_first_rung_is_longer_than_a_fine_tune_cheap_score():
    assert selection_steps(create_score("kl"), 20) == 20
    assert selection_steps(create_score("finetune", {"steps": 30}), 20) == 30 * SELECT_ETA
    assert selection_steps(create_score("finetune", {"steps": 5}), 20) == 20
    tuned = selection_score(create_score("finetune", {"steps": 5, "lr": 0.02, "metric": "loss"}), 40)
    assert (tuned.steps, tuned.lr, tuned.metric) == (40, 0.02, "loss")  # the cheap fine-tune's settings, longer


def test_by_default_the_selection_follows_a_fine_tune_score_only(case):
    """select_top=None: the 4 best and the uniform structure are compared after the fine-tune score (auto on a
    network without BatchNorm), not after the cheap scores; a caller's number wins either way."""
    assert [selection_size(None, create_score(name)) for name in ("finetune", "kl", "bn")] == [AUTO_SELECT_TOP, 0, 0]
    assert selection_size(0, create_score("finetune")) == 0 and selection_size(3, create_score("kl")) == 3
    plain = prune(case, "plain", budget=6, score_options={"steps": 2})
    assert plain.search.notes["score"]["name"] == "finetune"
    first_rung = plain.search.selection["rungs"][0]["structures"]
    assert AUTO_SELECT_TOP <= first_rung <= AUTO_SELECT_TOP + 1  # the 4 best distinct, the uniform one
    assert prune(case, "bn", budget=6).search.selection is None  # auto is kl there
    assert prune(case, "plain", budget=6, score_options={"steps": 2}, select_top=0).search.selection is None


def test_the_selection_holds_its_training_samples_for_a_latency_target_alone(case):
    """A latency target is a cost target: the selection runs after it, so its rungs need training batches even
    after a score that holds none (kl)."""
    data = engine.Data(train=case["train"], val=case["val"])
    for target in (autoprune.Target(latency_reduction=0.2), autoprune.Target(macs_reduction=0.5)):
        config = engine.PruneConfig(method="random", target=target, score="kl", select_top=2, select_samples=100)
        held = engine._score_training_batches(config, create_score("kl"), data, torch.device("cpu"))
        assert sum(len(targets) for _, targets in held) == 100
    drop = engine.PruneConfig(method="random", target=autoprune.Target(max_drop=1.0), score="kl", select_top=2)
    assert engine._score_training_batches(drop, create_score("kl"), data, torch.device("cpu")) == []


def test_selection_is_skipped_without_a_cost_target_or_with_top_below_two(case, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the selection ran")

    monkeypatch.setattr(engine, "successive_halving", fail)
    assert prune(case, select_top=1).search.selection is None
    result = autoprune.prune(case["bn"], case["example"], train_loader=case["train"], val_loader=case["val"],
                             **{**RUN, "macs_reduction": None}, max_drop=50.0, select_top=4)
    assert result.search.selection is None


@pytest.mark.parametrize(("name", "top"), [("bn", 0), ("kl", 0), ("loss", 0), ("finetune", 0), ("kl", 2)])
def test_a_search_at_chance_says_so_with_every_score(case, name, top):
    # all but one validation target of one class (a single class is refused): the majority rate is nearly 100%,
    # so every candidate is at chance level
    x, y = case["val"].dataset.tensors
    skewed = torch.zeros_like(y)
    skewed[0] = 1
    at_chance = DataLoader(TensorDataset(x, skewed), batch_size=48)
    options = {"score_options": QUICK_FINETUNE} if name == "finetune" else {}
    result = autoprune.prune(case["bn"], case["example"], train_loader=case["train"], val_loader=at_chance,
                             **{**RUN, "score": name, "select_top": top, "select_steps": 2, **options})
    assert any("chance level" in w for w in result.warnings), result.warnings
    assert (result.search.selection is not None) == (top > 0)


# ---- determinism and the test data -----------------------------------------------------------------------

def test_the_same_seed_gives_the_same_scores_and_choice(case):
    settings = {"score": "finetune", "score_options": QUICK_FINETUNE, "select_top": 2, "select_steps": 2}
    a, b = prune(case, "plain", **settings), prune(case, "plain", **settings)
    assert [(r.counts, r.accuracy, r.value) for r in a.history] == [(r.counts, r.accuracy, r.value) for r in b.history]
    assert a.keep == b.keep
    rungs = [[(r["steps"], r["structures"], r["best_value"], r["best_accuracy"]) for r in x.search.selection["rungs"]]
             for x in (a, b)]
    assert rungs[0] == rungs[1] and a.search.selection["chosen"] == b.search.selection["chosen"]


class GuardedLoader:
    """A test loader that fails if it is read before the search and the selection are over."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.open = loader, False

    def __iter__(self):
        if not self.open:
            raise AssertionError("the test loader was read during the search or the selection")
        return iter(self.loader)


class OpenAfterSearch(autoprune.Callback):
    def __init__(self, guarded: GuardedLoader) -> None:
        self.guarded = guarded

    def on_search_end(self, best) -> None:
        self.guarded.open = True


@pytest.mark.parametrize("name", ["kl", "finetune"])
def test_the_scores_never_read_the_test_loader(case, name):
    guarded = GuardedLoader(case["test"])
    options = {"score_options": QUICK_FINETUNE} if name == "finetune" else {}
    result = prune(case, score=name, select_top=2, select_steps=2, test_loader=guarded,
                   callbacks=[OpenAfterSearch(guarded)], **options)
    assert guarded.open and result.pruned.accuracy is not None


@pytest.mark.slow
def test_two_workers_score_as_one_process(case):
    settings = {"score": "finetune", "score_options": QUICK_FINETUNE, "method": "pso", "budget": 6,
                "method_options": {"particles": 3, "iterations": 2}}
    serial = prune(case, **settings)
    pooled = prune(case, workers=2, **settings)
    assert pooled.search.executor == "pool"
    assert [(r.counts, r.accuracy, r.value) for r in pooled.history] == \
        [(r.counts, r.accuracy, r.value) for r in serial.history]
    assert pooled.keep == serial.keep


class StopAfter(autoprune.Callback):
    def __init__(self, evaluations: int) -> None:
        self.evaluations, self.seen = evaluations, 0

    def on_evaluation(self, row) -> None:
        self.seen += 1

    def should_stop(self) -> bool:
        return self.seen >= self.evaluations


def test_a_resumed_run_ranks_the_replayed_candidates_by_their_recorded_value(case, tmp_path):
    # PSO carries state across asks: replaying the history with accuracies instead of KL values would diverge
    settings = {"method": "pso", "method_options": {"particles": 3, "iterations": 3}, "budget": 9, "score": "kl"}
    out = tmp_path / "run"
    with pytest.raises(engine.SearchInterrupted):
        prune(case, out=out, callbacks=[StopAfter(4)], **settings)
    resumed = prune(case, out=out, resume=True, **settings)
    reference = prune(case, **settings)
    assert resumed.search.resumed_evaluations == 4
    rows = [[(r.counts, r.accuracy, r.value, r.score) for r in x.history] for x in (resumed, reference)]
    assert rows[0] == rows[1] and resumed.keep == reference.keep
    assert all(r.value is not None for r in resumed.history)
