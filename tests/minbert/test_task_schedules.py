"""Task samplers: sequences, frequencies, epoch sizes, determinism, stages."""
import math
import subprocess
import sys

import pytest
import torch

from minbert.task_schedules import (
    TASK_SAMPLERS,
    JointSampler,
    ProportionalSampler,
    RandomSampler,
    RoundRobinSampler,
    StagedSampler,
    TaskSampler,
    build_task_sampler,
)

TASKS = ["sst", "quora", "sts"]
BATCHES = {"sst": 267, "quora": 8848, "sts": 189}  # the CS224N training sets at batch 32/16/32


def sequence(sampler, start, stop):
    return [tuple(sampler.tasks_for_step(s)) for s in range(start, stop)]


def counts(sampler, steps):
    out = {t: 0 for t in sampler.tasks}
    for s in range(steps):
        (task,) = sampler.tasks_for_step(s)
        out[task] += 1
    return out


def assert_frequencies(observed, probs, steps):
    """Each count within 4.5 binomial standard deviations of its expectation."""
    for task, p in probs.items():
        std = math.sqrt(steps * p * (1 - p))
        assert abs(observed[task] - steps * p) <= 4.5 * std + 1, (task, observed, probs)


# --- registry and interface --------------------------------------------------------------------

def test_registry_and_interface():
    assert set(TASK_SAMPLERS) == {"joint", "round_robin", "random", "proportional", "staged"}
    stages = [{"tasks": ["quora"], "epochs": 1}, {"schedule": "joint", "epochs": 1}]
    for kind, cls in TASK_SAMPLERS.items():
        opts = {"stages": stages} if kind == "staged" else {}
        s = build_task_sampler(kind, TASKS, BATCHES, seed=3, **opts)
        assert isinstance(s, cls) and isinstance(s, TaskSampler) and s.kind == kind
        assert isinstance(s.steps_per_epoch, int) and s.steps_per_epoch >= 1
        for step in (0, 1, 17, s.steps_per_epoch - 1):
            tasks = s.tasks_for_step(step)
            assert isinstance(tasks, list) and tasks and all(t in TASKS for t in tasks)


def test_joint_all_tasks_every_step_in_order():
    s = build_task_sampler("joint", TASKS, BATCHES, order=["sts", "sst", "quora"])
    assert all(s.tasks_for_step(k) == ["sts", "sst", "quora"] for k in range(50))
    assert build_task_sampler("joint", TASKS, BATCHES).tasks_for_step(7) == TASKS


def test_round_robin_order():
    s = build_task_sampler("round_robin", TASKS, BATCHES)
    assert [s.tasks_for_step(k)[0] for k in range(7)] == ["sst", "quora", "sts", "sst", "quora", "sts", "sst"]
    s = build_task_sampler("round_robin", TASKS, BATCHES, order=["sts", "quora", "sst"])
    assert [s.tasks_for_step(k)[0] for k in range(4)] == ["sts", "quora", "sst", "sts"]
    # repeats visit a task more often
    s = build_task_sampler("round_robin", TASKS, BATCHES, order=["quora", "sst", "quora", "sts"])
    assert [s.tasks_for_step(k)[0] for k in range(8)] == ["quora", "sst", "quora", "sts"] * 2
    assert s.shares() == {"sst": 0.25, "quora": 0.5, "sts": 0.25}


def test_random_uniform_frequencies():
    steps = 20000
    s = build_task_sampler("random", TASKS, BATCHES, seed=1)
    assert_frequencies(counts(s, steps), {t: 1 / 3 for t in TASKS}, steps)


@pytest.mark.parametrize("options, expected", [
    ({}, {t: b / sum(BATCHES.values()) for t, b in BATCHES.items()}),
    ({"weights": {"sst": 1.0, "quora": 2.0, "sts": 1.0}}, {"sst": 0.25, "quora": 0.5, "sts": 0.25}),
    ({"alpha": 0.5}, {t: math.sqrt(b) / sum(math.sqrt(v) for v in BATCHES.values()) for t, b in BATCHES.items()}),
    ({"temperature": 2.0}, {t: math.sqrt(b) / sum(math.sqrt(v) for v in BATCHES.values()) for t, b in BATCHES.items()}),
    ({"alpha": 0.0}, {t: 1 / 3 for t in TASKS}),
])
def test_proportional_frequencies(options, expected):
    steps = 20000
    s = build_task_sampler("proportional", TASKS, BATCHES, seed=2, **options)
    probs = s.probabilities()
    for t in TASKS:
        assert probs[t] == pytest.approx(expected[t], rel=1e-12)
    assert_frequencies(counts(s, steps), expected, steps)


def test_frequency_check_detects_a_wrong_distribution():
    """The tolerance is tight enough to tell proportional sampling from uniform sampling."""
    steps = 20000
    observed = counts(build_task_sampler("random", TASKS, BATCHES, seed=1), steps)
    with pytest.raises(AssertionError):
        assert_frequencies(observed, build_task_sampler("proportional", TASKS, BATCHES).probabilities(), steps)


# --- determinism -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "proportional"])
def test_same_seed_same_sequence_different_seed_differs(kind):
    a = sequence(build_task_sampler(kind, TASKS, BATCHES, seed=7), 0, 500)
    b = sequence(build_task_sampler(kind, TASKS, BATCHES, seed=7), 0, 500)
    c = sequence(build_task_sampler(kind, TASKS, BATCHES, seed=8), 0, 500)
    assert a == b
    assert a != c


@pytest.mark.parametrize("kind", ["joint", "round_robin", "random", "proportional", "staged"])
def test_resume_tail_equals_full_sequence(kind):
    """tasks_for_step is a function of (seed, step): a fresh sampler queried from step k
    (a resumed run, or another rank) continues the original sequence exactly."""
    opts = {"stages": [{"tasks": ["quora", "sts"], "schedule": "random", "epochs": 1},
                       {"schedule": "round_robin", "epochs": 1}]} if kind == "staged" else {}
    small = {"sst": 30, "quora": 50, "sts": 20}
    full_sampler = build_task_sampler(kind, TASKS, small, seed=11, **opts)
    n = min(300, full_sampler.total_steps or 300)
    full = sequence(full_sampler, 0, n)
    k = 123
    resumed = build_task_sampler(kind, TASKS, small, seed=11, **opts)
    resumed.load_state_dict(full_sampler.state_dict())
    assert sequence(resumed, k, n) == full[k:]
    # querying out of order does not change the answers (no hidden state)
    assert [tuple(full_sampler.tasks_for_step(s)) for s in reversed(range(n))] == full[::-1]


def test_draws_are_stable_across_processes():
    """No salted hash(): another interpreter (with a different PYTHONHASHSEED) draws the same tasks."""
    code = ("from minbert.task_schedules import build_task_sampler as b;"
            "s=b('random',['sst','quora','sts'],{'sst':3,'quora':5,'sts':2},seed=5);"
            "print(''.join(s.tasks_for_step(k)[0][1] for k in range(64)))")
    env_out = []
    for hashseed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "PYTHONHASHSEED": hashseed})
        env_out.append(out.stdout.strip())
    here = build_task_sampler("random", TASKS, {"sst": 3, "quora": 5, "sts": 2}, seed=5)
    expected = "".join(here.tasks_for_step(k)[0][1] for k in range(64))
    assert env_out == [expected, expected]


def test_load_state_dict_rejects_a_different_schedule():
    a = build_task_sampler("random", TASKS, BATCHES, seed=1)
    with pytest.raises(ValueError, match="seed"):
        build_task_sampler("random", TASKS, BATCHES, seed=2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="batches_per_epoch"):
        build_task_sampler("random", TASKS, {**BATCHES, "sts": 190}, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="kind"):
        build_task_sampler("round_robin", TASKS, BATCHES, seed=1).load_state_dict(a.state_dict())
    state = a.state_dict()
    del state["order"]
    with pytest.raises(ValueError, match="lacks keys"):
        a.load_state_dict(state)
    a.load_state_dict(a.state_dict())  # identical: accepted


def test_state_dict_survives_torch_save(tmp_path):
    s = build_task_sampler("staged", TASKS, BATCHES, seed=4,
                           stages=[{"tasks": ["quora"], "epochs": 1}, {"schedule": "proportional", "epochs": 2}])
    torch.save(s.state_dict(), tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert loaded == s.state_dict()
    s.load_state_dict(loaded)  # raises if anything was lost on the way
    assert [s.tasks_for_step(i) for i in range(20)] == [
        build_task_sampler("staged", TASKS, BATCHES, seed=4,
                           stages=[{"tasks": ["quora"], "epochs": 1}, {"schedule": "proportional", "epochs": 2}])
        .tasks_for_step(i) for i in range(20)]


# --- epoch sizes -------------------------------------------------------------------------------

def test_epoch_sizes_smallest_largest_multiplier():
    b = {"sst": 10, "quora": 100, "sts": 7}
    one_per_step = ("round_robin", "random")
    for kind in one_per_step:
        assert build_task_sampler(kind, TASKS, b).steps_per_epoch == 3 * 7
        assert build_task_sampler(kind, TASKS, b, epoch_size="smallest").steps_per_epoch == 3 * 7
        assert build_task_sampler(kind, TASKS, b, epoch_size=None).steps_per_epoch == 3 * 7
        assert build_task_sampler(kind, TASKS, b, epoch_size="largest").steps_per_epoch == 3 * 100
        assert build_task_sampler(kind, TASKS, b, epoch_size="smallest", multiplier=3).steps_per_epoch == 63
        assert build_task_sampler(kind, TASKS, b, epoch_size=50).steps_per_epoch == 50
        assert build_task_sampler(kind, TASKS, b, epoch_size=50, multiplier=1.5).steps_per_epoch == 75
    assert build_task_sampler("joint", TASKS, b, epoch_size="smallest").steps_per_epoch == 7
    assert build_task_sampler("joint", TASKS, b, epoch_size="largest").steps_per_epoch == 100
    assert build_task_sampler("joint", TASKS, b, epoch_size="largest", multiplier=0.5).steps_per_epoch == 50
    # proportional (alpha 1): every task runs out together after sum(b) steps (in expectation)
    for size in ("smallest", "largest"):
        assert build_task_sampler("proportional", TASKS, b, epoch_size=size).steps_per_epoch == 117
    # weights: sst 1/4, quora 1/2, sts 1/4 -> sst needs 40, quora 200, sts 28 steps
    w = {"sst": 1, "quora": 2, "sts": 1}
    assert build_task_sampler("proportional", TASKS, b, weights=w, epoch_size="smallest").steps_per_epoch == 28
    assert build_task_sampler("proportional", TASKS, b, weights=w, epoch_size="largest").steps_per_epoch == 200
    # round robin with repeats: quora has half of the steps
    rr = build_task_sampler("round_robin", TASKS, b, order=["quora", "sst", "quora", "sts"], epoch_size="largest")
    assert rr.steps_per_epoch == 200


def test_smallest_epoch_sees_the_smallest_task_once():
    b = {"sst": 10, "quora": 100, "sts": 7}
    s = build_task_sampler("round_robin", TASKS, b)
    seen = counts(s, s.steps_per_epoch)
    assert seen["sts"] == 7 and seen["sst"] == 7 and seen["quora"] == 7
    s = build_task_sampler("round_robin", TASKS, b, epoch_size="largest")
    assert counts(s, s.steps_per_epoch)["quora"] == 100


def test_epoch_for_step():
    s = build_task_sampler("round_robin", TASKS, {"sst": 2, "quora": 4, "sts": 3})
    assert s.steps_per_epoch == 6
    assert [s.epoch_for_step(k) for k in range(13)] == [0] * 6 + [1] * 6 + [2]


# --- staged ------------------------------------------------------------------------------------

def test_staged_boundaries():
    b = {"sst": 10, "quora": 100, "sts": 7}
    s = build_task_sampler("staged", TASKS, b, seed=0, stages=[
        {"tasks": ["quora"], "schedule": "joint", "epochs": 1},
        {"schedule": "round_robin", "epochs": 2},
        {"tasks": ["sst", "sts"], "schedule": "joint", "epochs": 1, "epoch_size": "largest"},
    ])
    assert isinstance(s, StagedSampler)
    assert s.stage_steps_per_epoch == [100, 21, 10]
    assert s.stage_starts == [0, 100, 142]
    assert s.total_steps == 152
    assert s.epoch_starts == [0, 100, 121, 142]
    assert s.steps_per_epoch == 152 // 4
    assert [s.stage_for_step(k) for k in (0, 99, 100, 141, 142, 151)] == [0, 0, 1, 1, 2, 2]
    assert [s.epoch_for_step(k) for k in (0, 99, 100, 120, 121, 141, 142, 151)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(s.tasks_for_step(k) == ["quora"] for k in range(100))
    assert [s.tasks_for_step(k)[0] for k in range(100, 106)] == ["sst", "quora", "sts"] * 2  # restarts at 0
    assert s.tasks_for_step(142) == ["sst", "sts"]
    with pytest.raises(ValueError, match="past the end"):
        s.tasks_for_step(152)


def test_staged_inherits_epoch_size_multiplier_and_order():
    b = {"sst": 10, "quora": 100, "sts": 7}
    s = build_task_sampler("staged", TASKS, b, epoch_size="largest", multiplier=2, order=["sts", "quora", "sst"],
                           stages=[{"tasks": ["sst", "quora"], "schedule": "round_robin"}, {"schedule": "joint"}])
    assert s.stage_steps_per_epoch == [400, 200]
    assert s.samplers[0].order == ["quora", "sst"]
    assert s.samplers[1].tasks_for_step(0) == ["sts", "quora", "sst"]


def test_staged_random_stages_use_different_streams():
    s = build_task_sampler("staged", TASKS, BATCHES, seed=0, stages=[
        {"schedule": "random", "epoch_size": 200}, {"schedule": "random", "epoch_size": 200}])
    assert sequence(s, 0, 200) != sequence(s, 200, 400)


@pytest.mark.parametrize("stages, match", [
    (None, "non-empty list"),
    ([], "non-empty list"),
    ([{"tasks": ["quora"], "schedule": "nope"}, {}], "unknown schedule 'nope'"),
    ([{"tasks": ["quora"], "schedule": "staged"}], "cannot itself be 'staged'"),
    ([{"tasks": ["quora"], "epochs": 0}, {}], "epochs must be an int >= 1"),
    ([{"tasks": ["mnli"]}], r"tasks \['mnli'\] are not among"),
    ([{"tasks": ["quora"]}], r"tasks \['sst', 'sts'\] are in no stage"),
    ([{"tasks": ["quora"], "epoch": 1}, {}], r"unknown keys \['epoch'\]"),
    ([{"schedule": "round_robin", "weights": {"sst": 1, "quora": 1, "sts": 1}}],
     r"stages\[0\]: task schedule 'round_robin': unknown options \['weights'\]"),
])
def test_staged_errors(stages, match):
    with pytest.raises(ValueError, match=match):
        build_task_sampler("staged", TASKS, BATCHES, stages=stages)


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, kwargs, match", [
    ("nope", {}, "unknown task schedule 'nope'"),
    ("joint", {"alpha": 1.0}, r"unknown options \['alpha'\]"),
    ("round_robin", {"order": ["sst", "mnli", "quora", "sts"]}, r"tasks \['mnli'\] that are not among"),
    ("round_robin", {"order": ["sst", "quora"]}, r"leaves out tasks \['sts'\]"),
    ("random", {"order": ["sst", "sst", "quora", "sts"]}, "only 'round_robin' accepts repeats"),
    ("random", {"epoch_size": "biggest"}, "epoch_size must be"),
    ("random", {"epoch_size": 0}, "epoch_size must be"),
    ("random", {"epoch_size": 2.5}, "epoch_size must be"),
    ("random", {"multiplier": 0}, "multiplier must be"),
    ("random", {"multiplier": float("nan")}, "multiplier must be"),
    ("random", {"weights": {"sst": 1, "quora": 1, "sts": 1}}, "unknown options"),
    ("proportional", {"weights": {"sst": 1, "quora": 1}}, r"weights lack tasks \['sts'\]"),
    ("proportional", {"weights": {"sst": 1, "quora": 1, "sts": 1, "x": 1}}, r"'weights' refers to tasks \['x'\]"),
    ("proportional", {"weights": {"sst": 1, "quora": 0, "sts": 1}}, r"weights\['quora'\] must be"),
    ("proportional", {"alpha": -1}, "alpha must be"),
    ("proportional", {"alpha": 1, "temperature": 2}, "not both"),
    ("proportional", {"temperature": 0}, "temperature must be"),
    ("staged", {"stages": [{}], "weights": {"sst": 1, "quora": 1, "sts": 1}}, r"unknown options \['weights'\]"),
])
def test_build_errors(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_task_sampler(kind, TASKS, BATCHES, **kwargs)


@pytest.mark.parametrize("tasks, batches, match", [
    ([], BATCHES, "non-empty list"),
    ("sst", BATCHES, "non-empty list"),
    (["sst", "sst"], BATCHES, "duplicate tasks"),
    (["sst", "cfimdb"], BATCHES, r"batches_per_epoch lacks tasks \['cfimdb'\]"),
    (["sst"], {"sst": 0}, r"batches_per_epoch\['sst'\] must be an int >= 1"),
    (["sst"], [("sst", 3)], "must be a dict"),
])
def test_task_errors(tasks, batches, match):
    with pytest.raises(ValueError, match=match):
        build_task_sampler("random", tasks, batches)


def test_step_and_seed_errors():
    s = build_task_sampler("round_robin", TASKS, BATCHES)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            s.tasks_for_step(bad)
    with pytest.raises(ValueError, match="seed must be"):
        build_task_sampler("random", TASKS, BATCHES, seed=2 ** 64)
    # direct construction validates too
    with pytest.raises(ValueError, match="'weights' is not used by the 'joint' schedule"):
        JointSampler(TASKS, BATCHES, weights={"sst": 1, "quora": 1, "sts": 1})
    assert isinstance(RoundRobinSampler(TASKS, BATCHES), TaskSampler)
    assert RandomSampler(TASKS, BATCHES, seed=-5).tasks_for_step(3)[0] in TASKS
    assert ProportionalSampler(TASKS, BATCHES, temperature=4.0).alpha == 0.25
    with pytest.raises(ValueError, match="inside the stage"):
        StagedSampler(TASKS, BATCHES, stages=[{}], weights={"sst": 1, "quora": 1, "sts": 1})
