"""`python -m experiments.toy2d_meanflow`: the mean flow's few-step samples against flow
matching's on a 2-D toy, in a shortened run."""

import json

from experiments import toy2d_meanflow
from experiments.toy2d import Settings
from fmjax import meanflow


def test_one_mean_flow_jump_beats_one_euler_step_of_the_velocity(tmp_path):
    # MeanFlow's ImageNet loss learns fastest here (the default, p = 0.5, wins in long runs).
    settings = Settings(steps=300, log_every=100, num_samples=256)
    intervals = meanflow.logit_normal_intervals(0.4, 1.0, equal_fraction=0.5)
    metrics = toy2d_meanflow.run(
        str(tmp_path), "8gaussians", settings, intervals=intervals, adaptive_power=1.0
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "toy2d_meanflow.png").stat().st_size > 0
    fm, mf = (metrics["objectives"][o]["samples"] for o in toy2d_meanflow.OBJECTIVES)
    assert [fm[k]["nfe"] for k in ("1 step", "2 steps")] == [1, 2]
    assert [mf[k]["nfe"] for k in ("1 step", "2 steps")] == [1, 2]
    # One Euler step of a velocity field lands near the data mean (the eight modes' centre);
    # one jump of the average velocity reaches the modes.
    assert mf["1 step"]["w2"] < 0.6 * fm["1 step"]["w2"]
    # Both instantaneous fields are flows to the data: the ODE samples are close.
    floor = metrics["w2_floor"]
    assert fm["ODE"]["w2"] < 3 * floor and mf["ODE"]["w2"] < 3 * floor
