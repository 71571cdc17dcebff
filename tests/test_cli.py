import pytest
import typer
from typer.testing import CliRunner

from pipelines.cli import app
from training.data.folders import write_folder_dataset
from training.data.simulator import simulate_frames

runner = CliRunner()


def test_bad_override_is_a_clear_config_error():
    result = runner.invoke(app, ["segment", "train", "--set", "compute.epochs=-1"])
    assert result.exit_code == 2
    assert "compute.epochs" in result.output


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["train", "--set", "compute.epochs=-1"], "segment train"),
        (["adapt", "--set", "compute.epochs=-1"], "adapt train"),
    ],
)
def test_old_spellings_still_run_and_name_the_new_one_on_stderr(old, new):
    result = runner.invoke(app, old)
    assert result.exit_code == 2
    assert "compute.epochs" in result.output  # the command itself ran: the config was loaded and refused
    assert f"use `endoflow {new}`" in result.stderr
    assert "deprecated" not in result.stdout


def test_old_spellings_are_hidden_from_help():
    cli = typer.main.get_command(app)
    assert cli.commands["train"].hidden and cli.commands["propagate"].commands["bench"].hidden
    assert not cli.commands["bench"].commands["propagate"].hidden


def test_missing_config_file_names_it(tmp_path):
    result = runner.invoke(app, ["demo", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "missing.yaml" in result.output


def test_evaluate_reports_missing_data_and_missing_model(tmp_path):
    args = ["evaluate", "--model", str(tmp_path / "nope.onnx"), "--layout", "folder"]
    result = runner.invoke(app, [*args, "--data", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "empty" in result.output
    images, masks = simulate_frames(1, seed=0, style="sim", size=64)
    write_folder_dataset(str(tmp_path / "data"), images, masks)
    result = runner.invoke(app, [*args, "--data", str(tmp_path / "data")])
    assert result.exit_code == 2 and "nope.onnx" in result.output
