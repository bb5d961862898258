"""The EMA teacher schedule (objective.md) and update."""
import pytest
import torch

from calrft import ema


def test_momentum_schedule_paper_defaults():
    s = ema.EmaSchedule(total_steps=10_000)
    assert s.momentum(0) == pytest.approx(0.05)
    assert s.momentum(1000) == pytest.approx(0.05 + 0.85 * 0.5)
    assert s.momentum(2000) == pytest.approx(0.9)
    assert s.momentum(9999) == pytest.approx(0.9)
    ramp = [s.momentum(k) for k in range(0, 2001, 100)]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))


def test_update_every_500_and_at_the_last_step():
    s = ema.EmaSchedule(total_steps=1234)
    updates = [k for k in range(1, 1235) if s.should_update(k)]
    assert updates == [500, 1000, 1234]


def test_configurable():
    s = ema.EmaSchedule(total_steps=100, m_start=0.1, m_end=0.5, warmup_fraction=0.5, every=7)
    assert s.momentum(25) == pytest.approx(0.3)
    assert s.momentum(60) == pytest.approx(0.5)
    assert [k for k in range(1, 101) if s.should_update(k)][:3] == [7, 14, 21]


@pytest.mark.parametrize("kwargs,match", [({"total_steps": 0}, "total_steps"),
                                          ({"total_steps": 5, "every": 0}, "every"),
                                          ({"total_steps": 5, "m_end": 1.5}, "m_end")])
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ema.EmaSchedule(**kwargs)


def test_ema_update_formula_and_teacher_is_frozen():
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = ema.make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(5, 3))  # changes BN running stats and num_batches_tracked
    ema.ema_update(teacher, student, 0.7)
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.7 * before[k] + 0.3 * s)
        else:
            assert torch.equal(v, s)
