"""LR schedules: linear warm-up and decay, constant, exponential per epoch; the LambdaLR wrapper."""
import pytest
import torch

from minbert.lr_schedules import LR_SCHEDULES, build_lr_scheduler, lr_factor


def linear_reference(step, total, warmup):
    """transformers.get_linear_schedule_with_warmup's multiplier, written out."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def test_lr_schedules_tuple():
    assert LR_SCHEDULES == ("constant", "linear", "exponential")


def test_linear_key_steps():
    f = lambda k: lr_factor("linear", k, total_steps=100, steps_per_epoch=10, warmup_steps=10)  # noqa: E731
    assert f(0) == 0.0
    assert f(5) == 0.5
    assert f(10) == 1.0  # warm-up end
    assert f(55) == 0.5  # mid-decay
    assert f(99) == pytest.approx(1 / 90)
    assert f(100) == 0.0  # last
    assert f(150) == 0.0
    for total, warmup in ((100, 10), (37, 0), (5, 5), (1, 0), (64, 3)):
        for k in range(total + 3):
            assert lr_factor("linear", k, total_steps=total, steps_per_epoch=7, warmup_steps=warmup) == \
                pytest.approx(linear_reference(k, total, warmup), abs=1e-15)


def test_linear_matches_transformers():
    transformers = pytest.importorskip("transformers")
    for total, warmup in ((50, 6), (13, 0)):
        opt_a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        opt_b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        ours = build_lr_scheduler(opt_a, "linear", total_steps=total, steps_per_epoch=5, warmup_steps=warmup)
        ref = transformers.get_linear_schedule_with_warmup(opt_b, warmup, total)
        for _ in range(total + 2):
            assert opt_a.param_groups[0]["lr"] == pytest.approx(opt_b.param_groups[0]["lr"], abs=1e-15)
            opt_a.step(), opt_b.step(), ours.step(), ref.step()


def test_constant_with_and_without_warmup():
    assert all(lr_factor("constant", k, total_steps=20, steps_per_epoch=5) == 1.0 for k in range(25))
    vals = [lr_factor("constant", k, total_steps=20, steps_per_epoch=5, warmup_steps=4) for k in range(8)]
    assert vals == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert lr_factor("constant", 3, total_steps=None, steps_per_epoch=None) == 1.0


def test_exponential_epoch_boundaries():
    f = lambda k, **kw: lr_factor("exponential", k, total_steps=100, steps_per_epoch=10, **kw)  # noqa: E731
    assert [f(k) for k in (0, 9)] == [1.0, 1.0]
    assert f(10) == pytest.approx(0.9) and f(19) == pytest.approx(0.9)
    assert f(20) == pytest.approx(0.81)
    assert f(99) == pytest.approx(0.9 ** 9)
    for k in range(0, 100, 3):
        assert f(k, gamma=0.5) == pytest.approx(0.5 ** (k // 10), rel=1e-15)
        assert f(k, warmup_steps=15) == pytest.approx(min(1.0, k / 15) * 0.9 ** (k // 10), rel=1e-15)
    assert f(5, gamma=1.0) == 1.0
    # uneven epochs (staged): the epoch index comes from epoch_starts
    starts = [0, 100, 121, 142]
    g = lambda k: lr_factor("exponential", k, total_steps=152, steps_per_epoch=38, epoch_starts=starts)  # noqa: E731
    assert [g(k) for k in (0, 99, 100, 120, 121, 142, 151)] == pytest.approx([1, 1, .9, .9, .81, .729, .729])


def test_build_lr_scheduler_follows_lr_factor():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = build_lr_scheduler(opt, "exponential", total_steps=30, steps_per_epoch=4, warmup_steps=3, gamma=0.8)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    for k in range(30):
        expected = 0.2 * lr_factor("exponential", k, total_steps=30, steps_per_epoch=4, warmup_steps=3, gamma=0.8)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-15)
        opt.step()
        sched.step()
    # the scheduler state round-trips (a resume continues the schedule)
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.2)
    sched2 = build_lr_scheduler(opt2, "exponential", total_steps=30, steps_per_epoch=4, warmup_steps=3, gamma=0.8)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch == 30


@pytest.mark.parametrize("kind, kwargs, match", [
    ("cosine", {}, "unknown lr schedule 'cosine'"),
    ("linear", {"step": -1}, "step must be an int >= 0"),
    ("linear", {"total_steps": 0}, "total_steps must be an int >= 1"),
    ("linear", {"total_steps": None}, "total_steps is required"),
    ("linear", {"warmup_steps": -2}, "warmup_steps must be an int >= 0"),
    ("linear", {"warmup_steps": 200}, r"warmup_steps \(200\) exceeds total_steps \(100\)"),
    ("exponential", {"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
    ("exponential", {"gamma": 1.5}, r"gamma must be in \(0, 1\]"),
    ("exponential", {"steps_per_epoch": None}, "steps_per_epoch is required"),
    ("exponential", {"steps_per_epoch": 0}, "steps_per_epoch must be an int >= 1"),
    ("exponential", {"epoch_starts": [1, 5]}, "epoch_starts must be"),
])
def test_lr_errors(kind, kwargs, match):
    args = {"step": 3, "total_steps": 100, "steps_per_epoch": 10, **kwargs}
    step = args.pop("step")
    with pytest.raises(ValueError, match=match):
        lr_factor(kind, step, **args)
    if step >= 0:  # the scheduler checks the same arguments when it is built
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        with pytest.raises(ValueError, match=match):
            build_lr_scheduler(opt, kind, **args)
