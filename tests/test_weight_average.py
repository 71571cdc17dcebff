"""The propagation job's weight averages: the uniform one (SWA) is the mean of every step's weights since it began,
and it resumes with its step count; the config refuses both averages at once, or one that starts after the run."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from training.config import load_config
from training.models.propagation.network import PropagationNet
from training.propagate.config import PropagateJobConfig
from training.propagate.train import weight_average

TINY_MODEL = "model={key_dim: 8, value_dim: 8, c4: 8, c8: 8, c16: 8, decoder_width: 8}"


def job(*overrides: str) -> PropagateJobConfig:
    return load_config(PropagateJobConfig, None, [TINY_MODEL, "compute.epochs=4", *overrides])


def filled(model: torch.nn.Module, value: float) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    return model


def test_uniform_average_is_the_mean_of_the_steps_and_resumes_with_its_count():
    cfg = job("weight_average_from_epoch=2")
    model = PropagationNet(cfg.model)
    averaged = weight_average(model, cfg, None)
    for value in (1.0, 2.0, 6.0):
        averaged.update_parameters(filled(model, value))
    first = next(averaged.module.parameters())
    assert torch.allclose(first, torch.full_like(first, 3.0))  # (1 + 2 + 6) / 3, not a moving average

    # A resumed run continues the same mean: a fourth step of 7 gives (1 + 2 + 6 + 7) / 4.
    state = {"model": averaged.module.state_dict(), "trained_model": model.state_dict(), "averaged_steps": 3}
    resumed = weight_average(PropagationNet(cfg.model), cfg, state)
    resumed.update_parameters(filled(PropagationNet(cfg.model), 7.0))
    assert torch.allclose(next(resumed.module.parameters()), torch.full_like(first, 4.0))


def test_no_average_unless_asked_and_the_moving_average_still_works():
    assert weight_average(PropagationNet(job().model), job(), None) is None
    cfg = job("weight_average_decay=0.5")
    model = PropagationNet(cfg.model)
    averaged = weight_average(model, cfg, None)
    for value in (2.0, 4.0):
        averaged.update_parameters(filled(model, value))
    assert torch.allclose(next(averaged.module.parameters()), torch.tensor(3.0))  # 0.5 * 2 + 0.5 * 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["weight_average_decay=0.99", "weight_average_from_epoch=2"], "not both"),
        (["weight_average_from_epoch=5"], "after the last epoch"),
        (["weight_average_from_epoch=0"], "weight_average_from_epoch"),
    ],
)
def test_config_refuses_averages_that_cannot_run(overrides, message):
    with pytest.raises((ValueError, ValidationError), match=message):
        job(*overrides)
