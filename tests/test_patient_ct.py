"""`endoflow patient adapt --layout flare22`: a patient's CT volumes (FLARE22 layout, as `propagate simulate-ct`
writes it) with one labelled slice each. Bad volumes, label files and settings fail before anything trains, naming
the file; a tiny run on two simulator volumes, without a segmenter (propagation confidence alone), writes organ
pseudo-labels, fine-tunes a 14-class (FLARE22) segmenter and exports it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_patient import SIZE, TINY_SEGMENTER, invoke_without_training, models  # noqa: F401 (models: the tiny propagation net and segmenter)
from typer.testing import CliRunner

from pipelines.cli import app
from training.config import ConfigError, load_config
from training.data.classes import FLARE22_CLASS_NAMES
from training.data.folders import DataError, folder_index, load_frames
from training.data.volumes import ORGANS, read_case, simulate_volume, write_case, write_nifti
from training.patient.config import PatientJobConfig
from training.patient.volumes import read_volumes
from training.propagate.inference import volume_frames
from training.propagate.scoring import middle_key_slice

SLICES = 8
SHAPE = (32, 32, SLICES)


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, Path]:
    """Two tiny simulator CT volumes in FLARE22 layout, fully labelled (the job reads only the key slices)."""
    root = tmp_path / "ct"
    for seed in (5000, 5001):
        write_case(root, simulate_volume(seed, shape=SHAPE))
    return {"frames": root, "root": tmp_path}


def ct_args(volumes: dict[str, Path], *extra: str) -> list[str]:
    return [
        "patient",
        "adapt",
        "--layout",
        "flare22",
        "--frames",
        str(volumes["frames"]),
        "--set",
        f"runs_dir={volumes['root'] / 'runs'}",
        "--set",
        f"size={SIZE}",
        "--set",
        "pseudo.agreement=propagation",
        *extra,
    ]


def test_volumes_are_sequences_of_windowed_slices_labelled_on_their_middle_slice(volumes) -> None:
    cfg = load_config(PatientJobConfig, None, ["data.layout=flare22", f"data.frames={volumes['frames']}"])
    assert cfg.data.labels == str(volumes["frames"]) and cfg.model.label_set == "flare22"
    assert cfg.model.num_classes == 14 and cfg.missing_inputs() == [
        "propagation_model",
        "segmenter (or pseudo.agreement=propagation)",
    ]
    sequences = read_volumes(cfg.data, SIZE, cfg.model.class_names, lambda _: None)
    assert [s.name for s in sequences] == ["sim_5000", "sim_5001"]
    volume = read_case(
        volumes["frames"] / "imagesTr" / "sim_5000_0000.nii.gz", volumes["frames"] / "labelsTr" / "sim_5000.nii.gz"
    )
    middle = middle_key_slice(volume.labels, "sim_5000")
    frames, keys = volume_frames(volume.hu, {middle: volume.labels[:, :, middle]}, SIZE)
    assert sequences[0].frames.shape == (SLICES, SIZE, SIZE, 3)
    np.testing.assert_array_equal(sequences[0].frames, frames)  # as `propagate evaluate` sees the volume
    assert list(sequences[0].key_labels) == [middle]
    np.testing.assert_array_equal(sequences[0].key_labels[middle], keys[middle])
    assert set(np.unique(keys[middle])) <= {0, *ORGANS}

    chosen = cfg.data.model_copy(update={"key_slices": [1, 5], "sequences": ["sim_5001"]})
    assert [sorted(s.key_labels) for s in read_volumes(chosen, SIZE, cfg.model.class_names)] == [[1, 5]]
    with pytest.raises(DataError, match=r"unknown volume\(s\) \['sim_9'\]"):
        read_volumes(cfg.data.model_copy(update={"sequences": ["sim_9"]}), SIZE, cfg.model.class_names)


# ------------------------------------------------------------------------------- bad input, before any training


def label_file(volumes: dict[str, Path], case: str = "sim_5001") -> Path:
    return volumes["frames"] / "labelsTr" / f"{case}.nii.gz"


def break_label_shape(volumes: dict[str, Path]) -> Path:
    return write_nifti(label_file(volumes), np.zeros((16, 32, SLICES), np.uint8), (2.0, 2.0, 4.0))


def break_label_class(volumes: dict[str, Path]) -> Path:
    volume = simulate_volume(5001, shape=SHAPE)
    middle = middle_key_slice(volume.labels, "sim_5001")
    volume.labels[:4, :4, middle] = 20  # FLARE22 labels are 0..13
    return write_nifti(label_file(volumes), volume.labels, volume.spacing)


def break_no_labelled_slice(volumes: dict[str, Path]) -> Path:
    return write_nifti(label_file(volumes), np.zeros(SHAPE, np.uint8), (2.0, 2.0, 4.0))


def break_volume_without_slices(volumes: dict[str, Path]) -> Path:
    return write_nifti(
        volumes["frames"] / "imagesTr" / "sim_5001_0000.nii.gz", np.zeros((32, 32, 0), np.int16), (2.0, 2.0, 4.0)
    )


BREAKS = {
    "label volume of another shape": (break_label_shape, "labels have shape (16, 32, 8)"),
    "unknown class value": (break_label_class, "holds label values 20"),
    "no labelled slice": (break_no_labelled_slice, "no labelled slice to start from"),
    "volume without slices": (break_volume_without_slices, "expected a 3-D volume"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_bad_volumes_fail_before_training_naming_the_file(case, volumes, models, monkeypatch) -> None:  # noqa: F811
    bad, message = BREAKS[case]
    named = bad(volumes)
    args = ct_args(volumes, "--propagation-model", str(models["propagation"]))
    result = invoke_without_training(monkeypatch, args)
    assert result.exit_code == 2, result.output
    assert flat(str(named)) in flat(result.output) and flat(message) in flat(result.output), result.output
    assert "Traceback" not in result.output


def test_settings_that_do_not_fit_ct_are_refused(volumes, models) -> None:  # noqa: F811
    base = ["data.layout=flare22", f"data.frames={volumes['frames']}"]
    with pytest.raises(ConfigError, match="sim_share must be 0 with data.layout flare22"):
        load_config(PatientJobConfig, None, [*base, "sim_share=0.2"])
    with pytest.raises(ConfigError, match="needs model.label_set flare22"):
        load_config(PatientJobConfig, None, [*base, "model.label_set=laryngoscopy"])
    with pytest.raises(ConfigError, match="key_slices"):
        load_config(PatientJobConfig, None, [*base, "data.key_slices=[]"])

    args = ct_args(volumes, "--propagation-model", str(models["propagation"]))
    outside = CliRunner().invoke(app, [*args, "--set", "data.key_slices=[3, 50]"])
    assert outside.exit_code == 2 and "keyslice(s)[50]outsideits8slices" in flat(outside.output), outside.output
    assert "sim_5000.nii.gz" in flat(outside.output)
    # the tests' segmenter answers the 7 laryngoscopy classes: it cannot vote on organs
    seven = CliRunner().invoke(
        app, [*args, "--segmenter", str(models["segmenter"]), "--set", "pseudo.agreement=segmenter"]
    )
    assert seven.exit_code == 2 and "7classes,butmodelhas14" in flat(seven.output), seven.output
    assert "seg.onnx" in flat(seven.output)


def flat(output: str) -> str:
    return "".join(output.split())  # rich wraps long lines


# ------------------------------------------------------------------------------------------ a tiny whole run


@pytest.mark.slow
def test_a_tiny_ct_patient_run_pseudo_labels_organs_finetunes_and_exports(volumes, models, ray_session) -> None:  # noqa: F811
    runs = volumes["root"] / "runs"
    args = ct_args(
        volumes,
        "--propagation-model",
        str(models["propagation"]),
        "--set",
        f"model={json.dumps(TINY_SEGMENTER)}",
        "--set",
        "compute={workers: 1, batch_size: 4, epochs: 1}",
        "--set",
        "pseudo.threshold=0.9",  # an untrained propagation net is unsure: keep most of its pixels
        "--set",
        "pseudo.min_kept=0.0",
        "--set",
        f"tracking.tracking_uri=sqlite:///{runs / 'mlflow.db'}",
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    training_set = runs / "patient" / "patient" / "train"
    written = json.loads((training_set / "pseudo_labels.json").read_text())
    # every slice of both volumes (min_kept 0) plus 3 more copies of each labelled slice
    assert written["frames_written"] == 2 * SLICES + 2 * 3
    assert json.loads((training_set / "classes.json").read_text())["13"] == "left_kidney"
    images, masks = load_frames(folder_index(str(training_set)))
    assert len(images) == written["frames_written"] and images.shape[1:] == (SIZE, SIZE, 3)
    assert set(np.unique(masks)) <= {0, *ORGANS, 255} and set(np.unique(masks)) & set(ORGANS)

    onnx_path = runs / "patient" / "patient" / "patient.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = json.loads(session.get_modelmeta().custom_metadata_map["endoflow.class_names"])
    assert names == list(FLARE22_CLASS_NAMES)
    logits = session.run(["logits"], {"image": np.zeros((1, 3, SIZE, SIZE), np.float32)})[0]
    assert logits.shape == (1, 14, SIZE, SIZE)
