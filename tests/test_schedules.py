import math

import numpy as np
import pytest

from dinoforge.training.schedules import CosineSchedule, sqrt_scaled_lr


def reference_array(base, final, total, warmup=0, start_warmup=0.0, freeze=0) -> np.ndarray:
    """The official array-based definition (freeze zeros, linspace warmup, cosine over np.arange)."""
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.zeros(freeze), np.linspace(start_warmup, base, warmup), cosine))


@pytest.mark.parametrize(
    "config",
    [
        dict(base_value=4e-3, final_value=1e-6, total_iters=50, warmup_iters=10, start_warmup_value=1e-5),
        dict(base_value=0.04, final_value=0.2, total_iters=17, warmup_iters=1, start_warmup_value=0.01),
        dict(base_value=0.992, final_value=1.0, total_iters=23, warmup_iters=0),
        dict(base_value=1.0, final_value=0.0, total_iters=30, warmup_iters=5, start_warmup_value=0.5, freeze_iters=7),
        dict(base_value=2.0, final_value=1.0, total_iters=8, warmup_iters=4, freeze_iters=4),  # no cosine part
    ],
)
def test_matches_array_definition_at_every_step(config):
    schedule = CosineSchedule(**config)
    expected = reference_array(
        config["base_value"],
        config["final_value"],
        config["total_iters"],
        config.get("warmup_iters", 0),
        config.get("start_warmup_value", 0.0),
        config.get("freeze_iters", 0),
    )
    assert len(expected) == config["total_iters"]
    got = np.array([schedule(step) for step in range(config["total_iters"])])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert all(isinstance(schedule(step), float) for step in (0, config["total_iters"]))


def test_warmup_endpoints_are_exact():
    schedule = CosineSchedule(base_value=0.5, final_value=0.1, total_iters=100, warmup_iters=10, start_warmup_value=0.2)
    assert schedule(0) == 0.2
    assert schedule(9) == 0.5  # last warmup step is base_value exactly
    assert schedule(10) == 0.5  # cosine starts at base_value (cos 0 = 1)
    assert schedule(5) == pytest.approx(0.2 + 0.3 * 5 / 9, abs=1e-15)


def test_single_warmup_step_is_start_value():
    schedule = CosineSchedule(base_value=1.0, final_value=0.0, total_iters=5, warmup_iters=1, start_warmup_value=0.3)
    assert schedule(0) == 0.3
    assert schedule(1) == 1.0


def test_cosine_midpoint_freeze_and_beyond_total():
    schedule = CosineSchedule(base_value=1.0, final_value=0.2, total_iters=110, warmup_iters=5, freeze_iters=5)
    assert [schedule(step) for step in range(5)] == [0.0] * 5
    assert schedule(5) == 0.0  # warmup starts at start_warmup_value = 0
    assert schedule(10 + 50) == pytest.approx((1.0 + 0.2) / 2, abs=1e-12)  # i = n/2 of n = 100
    assert schedule(109) == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi * 99 / 100)), abs=1e-12)
    assert schedule(109) > 0.2  # the array stops one step short of final_value ...
    assert schedule(110) == 0.2 and schedule(10**9) == 0.2  # ... which holds from total_iters on


def test_validation_names_the_fields():
    with pytest.raises(ValueError, match="total_iters.*warmup_iters.*freeze_iters"):
        CosineSchedule(base_value=1.0, final_value=0.0, total_iters=10, warmup_iters=6, freeze_iters=5)
    with pytest.raises(ValueError, match="warmup_iters"):
        CosineSchedule(base_value=1.0, final_value=0.0, total_iters=10, warmup_iters=-1)
    with pytest.raises(ValueError, match="freeze_iters"):
        CosineSchedule(base_value=1.0, final_value=0.0, total_iters=10, freeze_iters=-2)
    with pytest.raises(ValueError, match="step"):
        CosineSchedule(base_value=1.0, final_value=0.0, total_iters=10)(-1)


def test_schedule_is_frozen():
    schedule = CosineSchedule(base_value=1.0, final_value=0.0, total_iters=10)
    with pytest.raises(AttributeError):
        schedule.base_value = 2.0  # type: ignore[misc]


def test_sqrt_scaled_lr():
    assert sqrt_scaled_lr(4e-3, 1024) == 4e-3
    assert sqrt_scaled_lr(4e-3, 4096) == pytest.approx(8e-3, rel=1e-12)
    assert sqrt_scaled_lr(1e-3, 256) == pytest.approx(5e-4, rel=1e-12)
    with pytest.raises(ValueError, match="total_batch_size"):
        sqrt_scaled_lr(1e-3, 0)
