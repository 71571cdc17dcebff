"""The trained translator as a file: what the translator job exports and the adapt job and `style apply` load.

Format: a torch file {"format": FORMAT, "config": TranslatorConfig dump, "generator": state_dict}, loaded with
`weights_only=True` (plain tensors and dicts, no pickled code).
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.models.translator import Generator, TranslatorConfig, to_signed, to_unit

FORMAT = "endoflow-translator/1"


def save_generator(generator: Generator, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in generator.state_dict().items()}
    torch.save({"format": FORMAT, "config": generator.cfg.model_dump(), "generator": state}, path)
    return path


def load_generator(path: str | Path, field: str = "translator") -> Generator:
    """The generator in `path`, in eval mode; errors name `field` (the config key that gave the path) and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{field}: translator file {path} does not exist (`endoflow style train` makes one)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a torch archive
        raise ValueError(f"{field}: {path} is not a translator file ({exc.__class__.__name__})") from exc
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{field}: {path} is not a translator file (expected format {FORMAT!r})")
    generator = Generator(TranslatorConfig.model_validate(saved["config"]))
    generator.load_state_dict(saved["generator"])
    return generator.eval()


@torch.no_grad()
def translate_unit(generator: Generator, unit_bchw: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → translated, same shape and range."""
    outputs = [to_unit(generator(to_signed(unit_bchw[i : i + chunk]))) for i in range(0, len(unit_bchw), chunk)]
    return torch.cat(outputs) if outputs else unit_bchw
