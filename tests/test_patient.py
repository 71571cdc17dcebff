"""`endoflow patient adapt`: bad input fails before anything trains, naming the file, with the sequences as folders
of frames or as video files; the same sequences as videos read as the same frames and labels, and propagate into a
training set; a tiny run on simulator sequences (an untrained propagation net, an untrained exported segmenter, a
few epochs at 64 px) writes the pseudo-labelled set, fine-tunes, registers NAME@ALIAS in a sqlite MLflow and is
served from the registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_video
from PIL import Image
from typer.testing import CliRunner, Result

from pipelines.cli import app
from training.config import load_config
from training.data.folders import DataError, folder_index, load_frames
from training.data.simulator import simulate_sequences
from training.export import export_segmenter
from training.models.propagation.network import PropagationConfig, PropagationNet
from training.models.unet import Segmenter, UNetConfig
from training.patient.config import PatientDataConfig, PatientJobConfig
from training.patient.inputs import read_patient
from training.patient.train import finetune_config, prepare
from training.propagate.config import PropagateJobConfig
from training.propagate.models import save_model

SIZE = 64
FRAMES = 6
TINY_SEGMENTER = {"base_width": 4, "depth": 2, "blocks_per_level": 1}


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def patient(tmp_path: Path) -> dict[str, Path]:
    """Two simulator sequences as folders of frames; seq0 labelled on its first frame, seq1 on its third."""
    frames, truth = simulate_sequences(2, FRAMES, seed=7, style="real-like", size=SIZE)
    root, labels = tmp_path / "frames", tmp_path / "labels"
    for s in range(2):
        for t in range(FRAMES):
            write_png(root / f"seq{s}" / f"{t:03d}.png", frames[s, t])
    write_png(labels / "seq0" / "000.png", truth[0, 0])
    write_png(labels / "seq1" / "002.png", truth[1, 2])
    return {"frames": root, "labels": labels, "root": tmp_path}


@pytest.fixture
def video_patient(patient: dict[str, Path]) -> dict[str, Path]:
    """The same two sequences as lossless videos/seq<s>.mkv, their label maps named by frame index (000000, 000002)."""
    root, labels = patient["root"] / "videos", patient["root"] / "video-labels"
    for s in range(2):
        frames = np.stack([np.asarray(Image.open(f)) for f in sorted((patient["frames"] / f"seq{s}").iterdir())])
        write_video(root / f"seq{s}.mkv", frames)
    for s, t in ((0, 0), (1, 2)):
        labels.joinpath(f"seq{s}").mkdir(parents=True)
        (labels / f"seq{s}" / f"{t:06d}.png").write_bytes((patient["labels"] / f"seq{s}" / f"{t:03d}.png").read_bytes())
    return {"frames": root, "labels": labels, "root": patient["root"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained tiny propagation checkpoint and an untrained tiny segmenter ONNX, shared by the module's tests
    (they only read them): building them is most of a failing-input test's time."""
    tmp_path = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    small = PropagationConfig(key_dim=8, value_dim=16, c4=8, c8=16, c16=24, decoder_width=16)
    propagation_cfg = load_config(PropagateJobConfig, None, [f"data.size={SIZE}"]).model_copy(update={"model": small})
    propagation = save_model(PropagationNet(small).eval(), propagation_cfg, tmp_path / "propagation.pt")
    segmenter = export_segmenter(Segmenter(UNetConfig(**TINY_SEGMENTER)).eval(), tmp_path / "seg.onnx", SIZE)
    return {"propagation": propagation, "segmenter": segmenter}


def adapt_args(patient: dict[str, Path], models: dict[str, Path], *extra: str) -> list[str]:
    return [
        "patient",
        "adapt",
        "--frames",
        str(patient["frames"]),
        "--labels",
        str(patient["labels"]),
        "--propagation-model",
        str(models["propagation"]),
        "--segmenter",
        str(models["segmenter"]),
        "--set",
        f"runs_dir={patient['root'] / 'runs'}",
        "--set",
        f"size={SIZE}",
        *extra,
    ]


# ------------------------------------------------------------------------------- bad input, before any training


def break_label_size(patient: dict[str, Path]) -> Path:
    return write_png(patient["labels"] / "seq1" / "002.png", np.zeros((SIZE // 2, SIZE), np.uint8))


def break_label_class(patient: dict[str, Path]) -> Path:
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[5:9, 5:9] = 9  # classes are 0..6
    return write_png(patient["labels"] / "seq0" / "000.png", labels)


def break_empty_sequence(patient: dict[str, Path]) -> Path:
    empty = patient["frames"] / "seq2"
    empty.mkdir()
    return empty


def break_label_without_frame(patient: dict[str, Path]) -> Path:
    return write_png(patient["labels"] / "seq0" / "999.png", np.zeros((SIZE, SIZE), np.uint8))


def break_video_label_size(videos: dict[str, Path]) -> Path:
    return write_png(videos["labels"] / "seq1" / "000002.png", np.zeros((SIZE // 2, SIZE), np.uint8))


def break_video(videos: dict[str, Path]) -> Path:
    bad = videos["frames"] / "seq2.mp4"
    bad.write_text("not a video\n")
    return bad


def break_video_label_without_frame(videos: dict[str, Path]) -> Path:
    return write_png(videos["labels"] / "seq0" / "000006.png", np.zeros((SIZE, SIZE), np.uint8))  # frames 0..5


def break_video_label_class(videos: dict[str, Path]) -> Path:
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[5:9, 5:9] = 9  # classes are 0..6
    return write_png(videos["labels"] / "seq0" / "000000.png", labels)


BREAKS = {
    ("frames", "label map of another size"): (break_label_size, "expected equal sizes"),
    ("frames", "unknown class value"): (break_label_class, "mask values 9"),
    ("frames", "sequence without frames"): (break_empty_sequence, "a sequence without frames"),
    ("frames", "label map without its frame"): (break_label_without_frame, "a label map without its frame"),
    ("video", "label map of another size"): (break_video_label_size, "its frame (000002 of"),
    ("video", "unknown class value"): (break_video_label_class, "mask values 9"),
    ("video", "file that is not a video"): (break_video, "cannot open"),
    ("video", "label map without its frame"): (break_video_label_without_frame, "(000000..000005)"),
}


def invoke_without_training(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> Result:
    """`endoflow ARGS` with training and propagation made to fail the test if they start."""

    def no_training(*args, **kwargs):
        raise AssertionError("training started on bad input")

    monkeypatch.setattr("pipelines.patient_flow.train_and_release", no_training)
    monkeypatch.setattr("training.patient.train.pseudo_label_sequence", no_training)  # nor propagation
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("layout, case", list(BREAKS), ids=[" ".join(key) for key in BREAKS])
def test_bad_input_fails_before_training_naming_the_file(layout, case, request, models, monkeypatch) -> None:
    inputs = request.getfixturevalue("patient" if layout == "frames" else "video_patient")
    bad, message = BREAKS[layout, case]
    named = bad(inputs)
    result = invoke_without_training(monkeypatch, adapt_args(inputs, models, "--layout", layout))
    flat = "".join(result.output.split())  # rich wraps long paths
    assert result.exit_code == 2, result.output
    assert "".join(str(named).split()) in flat and "".join(message.split()) in flat, result.output
    assert "Traceback" not in result.output


def test_missing_models_and_labels_are_named(patient, models, tmp_path) -> None:
    args = adapt_args(patient, models)
    missing = tmp_path / "nope.pt"
    result = CliRunner().invoke(app, [*args, "--propagation-model", str(missing)])
    assert result.exit_code == 2 and "nope.pt" in "".join(result.output.split()), result.output
    result = CliRunner().invoke(app, ["patient", "adapt", "--frames", str(patient["frames"])])
    assert result.exit_code == 2 and "data.labels" in result.output, result.output


def test_read_patient_keys_labels_by_frame_and_leaves_unlabelled_sequences_out(patient) -> None:
    (patient["frames"] / "seq9").mkdir()
    write_png(patient["frames"] / "seq9" / "000.png", np.zeros((SIZE, SIZE, 3), np.uint8))
    notes: list[str] = []
    cfg = PatientJobConfig(data={"frames": str(patient["frames"]), "labels": str(patient["labels"])})
    sequences = read_patient(cfg.data, SIZE, notes.append)
    assert [s.name for s in sequences] == ["seq0", "seq1"]
    assert [sorted(s.key_labels) for s in sequences] == [[0], [2]]
    assert sequences[1].frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert any("seq9: no labelled frame" in note for note in notes)
    with pytest.raises(DataError, match="unknown sequence"):
        read_patient(cfg.data.model_copy(update={"sequences": ["seq7"]}), SIZE)


def test_videos_read_as_the_same_frames_and_labels_named_by_index(patient, video_patient) -> None:
    from_frames = read_patient(PatientDataConfig(frames=str(patient["frames"]), labels=str(patient["labels"])), SIZE)
    data = PatientDataConfig(frames=str(video_patient["frames"]), labels=str(video_patient["labels"]), layout="video")
    from_videos = read_patient(data, SIZE)
    assert [s.name for s in from_videos] == ["seq0", "seq1"]
    assert from_videos[1].frame_names == [f"{t:06d}" for t in range(FRAMES)]
    for video, frames in zip(from_videos, from_frames, strict=True):
        np.testing.assert_array_equal(video.frames, frames.frames)  # lossless video: the very frames
        assert video.key_labels.keys() == frames.key_labels.keys()
        for index, labels in frames.key_labels.items():
            np.testing.assert_array_equal(video.key_labels[index], labels)
    shutil.rmtree(video_patient["labels"] / "seq0")
    one = data.model_copy(update={"frames": str(video_patient["frames"] / "seq1.mkv")})  # a single video
    assert [s.name for s in read_patient(one, SIZE)] == ["seq1"]
    with pytest.raises(DataError, match="--layout video"):  # videos, but the frames layout asked for
        read_patient(data.model_copy(update={"layout": "frames"}), SIZE)


def test_a_video_patient_propagates_into_a_training_set_named_by_frame_index(video_patient, models) -> None:
    cfg = PatientJobConfig(
        data={
            "frames": str(video_patient["frames"]),
            "labels": str(video_patient["labels"]),
            "layout": "video",
            "sequences": ["seq1"],
        },
        propagation_model=str(models["propagation"]),
        segmenter=str(models["segmenter"]),
        runs_dir=str(video_patient["root"] / "runs"),
        size=SIZE,
        pseudo={"threshold": 0.9, "min_kept": 0.0},  # untrained models: agree loosely, so that frames are kept
        labelled_copies=1,
    )
    patient_set = prepare(cfg, progress=lambda note: None)
    images, masks = load_frames(folder_index(patient_set.uri))
    assert patient_set.frames_written == len(images) == FRAMES
    assert (Path(patient_set.uri) / "images" / "seq1" / f"{FRAMES - 1:06d}.png").is_file()
    keep = np.asarray(Image.open(Path(patient_set.uri) / "keep" / "seq1" / "000002.png"))
    assert keep.all()  # the labelled frame is kept whole


def test_the_finetuning_is_the_adapt_job_on_the_set_with_a_simulator_share() -> None:
    cfg = PatientJobConfig(sim_share=0.25, model=TINY_SEGMENTER)
    job = finetune_config(cfg, "/data/set", frames=30)
    assert job.source.kind == "sim" and job.source.count == 10  # 10 of 40 frames
    assert job.extra_labelled.uri == "/data/set" and job.extra_labelled.kind == "folder"
    assert not (job.irb.enabled or job.pseudo.enabled or job.adversarial.enabled) and job.style.method == "none"
    alone = finetune_config(cfg.model_copy(update={"sim_share": 0.0}), "/data/set", frames=30)
    assert alone.source.uri == "/data/set" and alone.extra_labelled is None


def test_the_patient_thresholds_are_sweepable() -> None:
    from training.tune import SweepConfig, check_space

    sweep = SweepConfig(
        job="patient",
        base={"val": {"kind": "sim", "count": 4}},
        space={
            "pseudo.threshold": {"type": "uniform", "low": 0.1, "high": 0.5},
            "sim_share": {"type": "choice", "values": [0, 0.5]},
        },
    )
    assert isinstance(check_space(sweep), PatientJobConfig)


# ------------------------------------------------------------------------------------------ a tiny whole run


@pytest.mark.slow
def test_a_tiny_patient_run_pseudo_labels_finetunes_registers_and_serves(patient, models, ray_session) -> None:
    import httpx
    import mlflow
    from conftest import serving

    runs = patient["root"] / "runs"
    tracking_uri = f"sqlite:///{runs / 'mlflow.db'}"
    args = adapt_args(
        patient,
        models,
        "--set",
        f"model={json.dumps(TINY_SEGMENTER)}",
        "--set",
        "compute={workers: 1, batch_size: 4, epochs: 2}",
        "--set",
        "pseudo.threshold=0.9",  # untrained models: agree loosely, so that propagated frames are kept
        "--set",
        "pseudo.min_kept=0.0",
        "--set",
        "sim_share=0.2",
        "--set",
        f"tracking.tracking_uri={tracking_uri}",
        "--register",
        "patient-seg@champion",
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "registered patient-seg@champion version 1" in result.output

    training_set = runs / "patient" / "patient" / "train"
    index = folder_index(str(training_set))
    assert index.keep is not None  # ignored pixels load as 255
    images, masks = load_frames(index)
    written = json.loads((training_set / "pseudo_labels.json").read_text())
    # every frame of both sequences (min_kept 0) plus 3 more copies of each labelled frame
    assert written["frames_written"] == len(images) == 2 * FRAMES + 2 * 3
    assert set(np.unique(masks)) <= set(range(7)) | {255}

    client = mlflow.MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias("patient-seg", "champion")
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "patient")}
    assert {
        "patient/pseudo-labels_seq0.png",
        "patient/pseudo-labels_seq1.png",
        "patient/before-after.png",
        "patient/pseudo_labels.json",
    } <= artifacts

    with serving("models:/patient-seg@champion", tracking_uri=tracking_uri) as url:
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        assert "patient-seg" in json.dumps(info), info
        frame = (patient["frames"] / "seq0" / "003.png").read_bytes()
        answer = httpx.post(f"{url}/v1/segment", content=frame, timeout=30)
        assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_sweep_over_the_pseudo_label_threshold_runs_the_patient_job(patient, models, ray_session) -> None:
    from pipelines.sweep_flow import sweep_and_log
    from training.tune import SweepConfig

    runs = patient["root"] / "sweep-runs"
    base = {
        "data": {"frames": str(patient["frames"]), "labels": str(patient["labels"])},
        "propagation_model": str(models["propagation"]),
        "segmenter": str(models["segmenter"]),
        "size": SIZE,
        "pseudo": {"min_kept": 0.0},
        "val": {"kind": "sim", "style": "real-like", "count": 4, "size": SIZE},
        "model": TINY_SEGMENTER,
        "compute": {"workers": 1, "batch_size": 4, "epochs": 1},
    }
    cfg = SweepConfig.model_validate(
        {
            "job": "patient",
            "base": base,
            "space": {"pseudo.threshold": {"type": "choice", "values": [0.5, 0.9]}},
            "num_samples": 2,
            "scheduler": "fifo",
            "name": "patient-sweep",
            "runs_dir": str(runs),
            "tracking": {"tracking_uri": f"sqlite:///{runs / 'mlflow.db'}"},
        }
    )
    result, out_dir = sweep_and_log(cfg)
    assert [t["status"] for t in result.trials] == ["completed", "completed"], result.trials
    best = load_config(PatientJobConfig, out_dir / "best_config.yaml")
    assert best.pseudo.threshold == result.best_params["pseudo.threshold"]
    for trial in result.trials:  # each trial wrote its own pseudo-labelled set
        assert (runs / "patient" / f"patient-sweep-{trial['trial_id']}" / "train" / "pseudo_labels.json").is_file()
