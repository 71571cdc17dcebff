"""One entry point for the training-free style transfers, so a job config can name its method as a string.

Every method maps float (B, 3, H, W) source images in [0, 1] toward the look of target images and keeps the geometry,
so the simulator labels stay valid. `beta` is FDA's low-frequency window and is ignored by the other methods.

The learned methods (`LEARNED_METHODS`) need their network passed as `model`: "translator" a trained generator
(generator_file.load_generator; the target images are not used), "adain" an AdaINNet with user weights
(adain.load_adain). `StyleMethod` stays the training-free set, for configs that cannot carry a network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

from training.style.colour import histogram_matching, lab_statistics_transfer
from training.style.fourier import fourier_style_transfer

StyleMethod = Literal["none", "fda", "lab", "histogram"]
STYLE_METHODS: tuple[str, ...] = get_args(StyleMethod)
AnyStyleMethod = Literal["none", "fda", "lab", "histogram", "translator", "adain"]
LEARNED_METHODS = ("translator", "adain")

_TRANSFERS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "fda": fourier_style_transfer,
    "lab": lambda source, target, _beta: lab_statistics_transfer(source, target),
    "histogram": lambda source, target, _beta: histogram_matching(source, target),
}


def apply_style(
    method: AnyStyleMethod,
    source_bchw: torch.Tensor,
    target_bchw: torch.Tensor | None,
    beta: float = 0.01,
    model: torch.nn.Module | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Translate `source_bchw` toward `target_bchw` with `method`; "none" returns the source unchanged."""
    if method not in STYLE_METHODS + LEARNED_METHODS:
        raise ValueError(f"unknown style method {method!r}; valid: {', '.join(STYLE_METHODS + LEARNED_METHODS)}")
    if method == "none":
        return source_bchw
    if method in LEARNED_METHODS and model is None:
        raise ValueError(f"style method {method!r} needs its trained network (model=), got None")
    if method == "translator":
        from training.style.generator_file import translate_unit

        return translate_unit(model, source_bchw).to(source_bchw.dtype)
    if target_bchw is None:
        raise ValueError(f"style method {method!r} needs target images, got None")
    if method == "adain":
        from training.style.adain import adain_transfer

        return adain_transfer(model, source_bchw, target_bchw, alpha)
    return _TRANSFERS[method](source_bchw, target_bchw, beta)
