"""`endoflow style apply`: translated sets written with their unchanged labels to a directory and to s3:// (moto),
the learned translator and AdaIN (user weights only) as methods, and the errors a user meets."""

import socket

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.style_flow import StyleApplyConfig, apply_style_dataset
from training.config import ConfigError, load_config
from training.data.folders import folder_index, load_frames
from training.data.sources import DataSpec, load_data
from training.models.translator import Generator, TranslatorConfig
from training.style.adain import AdaINConfig, AdaINNet, load_adain
from training.style.generator_file import save_generator

TINY = ["source.count=3", "source.size=32", "target.count=2", "target.size=32"]


def test_cli_writes_a_folder_set_with_the_source_labels(tmp_path):
    out = tmp_path / "fda"
    result = CliRunner().invoke(
        app, ["style", "apply", "--method", "fda", "--out", str(out), *_sets([*TINY, "beta=0.1"])]
    )
    assert result.exit_code == 0, result.output
    images, masks = load_frames(folder_index(str(out)))
    source, source_masks = load_data(DataSpec(kind="sim", count=3, size=32))
    np.testing.assert_array_equal(masks, source_masks)  # labels unchanged
    assert images.shape == source.shape and not np.array_equal(images, source)  # pixels translated


def test_translator_method_uses_the_generator_file(tmp_path):
    generator = Generator(TranslatorConfig(width=4, blocks=1))  # identity at init: output = input
    path = save_generator(generator, tmp_path / "g.pt")
    cfg = load_config(StyleApplyConfig, None, [*TINY, "method=translator", f"translator={path}", f"out={tmp_path}/t"])
    apply_style_dataset(cfg, progress=lambda _: None)
    images, _ = load_frames(folder_index(str(tmp_path / "t")))
    np.testing.assert_array_equal(images, load_data(DataSpec(kind="sim", count=3, size=32))[0])
    with pytest.raises(ConfigError, match="method=translator needs 'translator'"):
        load_config(StyleApplyConfig, None, ["method=translator"])
    missing = CliRunner().invoke(app, ["style", "apply", "--method", "translator", "--translator", "nope.pt"])
    assert missing.exit_code == 2 and "nope.pt does not exist" in missing.output


def test_adain_runs_with_user_weights_and_names_missing_or_wrong_files(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "adain.pt"
    torch.save(AdaINNet(width=4).state_dict(), weights)  # random weights, made here: nothing is downloaded
    net = load_adain(AdaINConfig(weights=str(weights), width=4))
    out = net(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    cfg = load_config(
        StyleApplyConfig,
        None,
        [*TINY, "method=adain", f"adain.weights={weights}", "adain.width=4", f"out={tmp_path}/a"],
    )
    assert apply_style_dataset(cfg, progress=lambda _: None)["frames"] == 3

    with pytest.raises(ValueError, match="adain.weights is not set"):
        load_adain(AdaINConfig())
    with pytest.raises(FileNotFoundError, match="adain.weights: weights file .*absent.pt does not exist"):
        load_adain(AdaINConfig(weights=str(tmp_path / "absent.pt")))
    with pytest.raises(ValueError, match="adain.weights: .*adain.pt does not fit AdaINNet\\(width=8\\)"):
        load_adain(AdaINConfig(weights=str(weights), width=8))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="text.pt is not a torch state dict"):
        load_adain(AdaINConfig(weights=str(tmp_path / "text.pt")))
    result = CliRunner().invoke(app, ["style", "apply", "--method", "adain"])
    assert result.exit_code == 2 and "adain.weights" in result.output


@pytest.fixture
def s3_bucket(monkeypatch, tmp_path):
    """An in-process S3 stand-in (moto) on a free local port; nothing leaves the machine."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "NO_PROXY": "127.0.0.1,localhost",
    }.items():
        monkeypatch.setenv(name, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket="translated")
    yield "translated"
    server.stop()


def test_apply_writes_to_s3(s3_bucket):
    uri = f"s3://{s3_bucket}/sets/lab"
    cfg = load_config(StyleApplyConfig, None, [*TINY, "method=lab", f"out={uri}"])
    assert apply_style_dataset(cfg, progress=lambda _: None)["frames"] == 3
    index = folder_index(uri)
    assert index.images[0] == f"{uri}/images/000000.png"
    _, masks = load_frames(index)
    np.testing.assert_array_equal(masks, load_data(DataSpec(kind="sim", count=3, size=32))[1])


def _sets(overrides: list[str]) -> list[str]:
    return [part for override in overrides for part in ("--set", override)]
