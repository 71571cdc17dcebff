"""The propagation job end to end on tiny simulated data: a 2-worker Ray Train run, resume, ONNX export with a
whole-sequence torch/onnxruntime parity check, pseudo-labels the folder loader reads, and the evaluate CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.propagate_flow import train_and_export
from serving.propagation_graphs import GRAPHS, graph_metadata
from training.config import load_config
from training.data.folders import folder_index, load_frames, write_folder_dataset
from training.data.simulator import simulate_sequences
from training.data.sources import DataSpec
from training.data.volumes import read_nifti, simulate_volume, write_case
from training.propagate import train as propagate_train
from training.propagate.config import PropagateJobConfig
from training.propagate.inference import MemoryPolicy
from training.propagate.models import last_weights_path, load_backend, load_model
from training.propagate.pseudo_labels import PseudoLabelConfig, pseudo_label_sequence, write_pseudo_dataset
from training.propagate.scoring import sequence_parity

pytestmark = pytest.mark.slow


def tiny_job(tmp_path, epochs: int) -> PropagateJobConfig:
    overrides = [
        "name=tiny",
        f"runs_dir={tmp_path}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.size=64",
        "data.sim_frames=8",
        "data.sim_sequences=2",
        "data.sim_length=6",
        "model={key_dim: 8, value_dim: 16, c4: 8, c8: 16, c16: 24, decoder_width: 16}",
        "steps_per_epoch=2",
        "stage1_epochs=1",
        "compute.workers=2",
        "compute.cpus_per_worker=1",
        "compute.batch_size=2",
        f"compute.epochs={epochs}",
        "weight_average_decay=0.5",  # tiny runs: a decay that leaves the average visibly apart from the weights
    ]
    return load_config(PropagateJobConfig, None, overrides)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("propagate")
    first = propagate_train.run(tiny_job(tmp_path, epochs=1), f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert first.metrics["epoch"] == 1 and first.metrics["stage"] == 1
    # Same name and storage: the second call resumes after epoch 1, runs stage 2, exports, checks parity and scores.
    frames, truth = simulate_sequences(1, 4, seed=11, style="real-like", size=64)
    write_folder_dataset(str(tmp_path / "eval"), frames[0], truth[0], [f"clip/{t:03d}" for t in range(4)])
    eval_spec = DataSpec(kind="folder", uri=str(tmp_path / "eval"), size=64)
    result = train_and_export(tiny_job(tmp_path, epochs=2), tmp_path / "out", eval_spec)
    return tmp_path, result


def test_resume_export_and_sequence_parity(trained):
    tmp_path, result = trained
    assert result.parity["jf_abs_diff"] <= 0.01
    for graph in GRAPHS:
        metadata = graph_metadata(result.graphs[graph])
        assert metadata["endoflow.task"] == "propagation" and metadata["endoflow.graph"] == graph
        assert json.loads(metadata["endoflow.memory"]) == {
            "mem_every": 2,
            "max_memory": 16,
            "previous_frame": True,
            "top_k": 20,
            "min_area": 0.005,
        }
        assert json.loads(metadata["endoflow.input_size"]) == [64, 64]
        assert json.loads(metadata["endoflow.class_names"])[1] == "vocal_folds"
    state = torch.load(result.model_path, weights_only=False)
    assert state["config"]["compute"]["epochs"] == 2
    # The exported model is the weight average, resumed with the run; the checkpoint keeps the trained weights too.
    last = sorted(p for p in (tmp_path / "ray" / "tiny").glob("checkpoint_*") if p.is_dir())[-1] / "state.pt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["epoch"] == 1 and set(checkpoint["model"]) == set(checkpoint["trained_model"])
    assert all(torch.equal(value, checkpoint["model"][name]) for name, value in state["model"].items())
    weights = [n for n, v in checkpoint["model"].items() if v.is_floating_point() and "running" not in n]
    assert any(not torch.equal(checkpoint["model"][n], checkpoint["trained_model"][n]) for n in weights)
    # the trained weights are saved beside the average, for the bench to score what averaging changed
    last = torch.load(last_weights_path(result.model_path), weights_only=False)["model"]
    assert all(torch.equal(last[n], checkpoint["trained_model"][n]) for n in weights)
    # A longer sequence at another size, with a memory that fills and rolls over. This barely trained model's
    # object probabilities often tie exactly, so its argmax (hence J&F) may flip on rounding: compare probabilities.
    frames, truth = simulate_sequences(1, 16, seed=5, style="real-like", size=96)
    model = load_model(state)
    parity = sequence_parity(model, result.graphs, frames[0], truth[0], MemoryPolicy(mem_every=2, max_memory=3))
    assert parity["confidence_max_abs_diff"] <= 1e-4
    # MLflow keeps the pictures: the curves of the run and the scored sequence with its truth and propagation
    assert result.evaluation["pictures"] == {"clip": str(tmp_path / "out" / "tiny_eval" / "clip.png")}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"tiny_curves.png", "propagation"}
    assert [a.path for a in client.list_artifacts(result.run_id, "propagation")] == ["propagation/clip.png"]


def test_pseudo_labels_are_a_readable_folder_dataset(trained, tmp_path):
    _, result = trained
    backend = load_backend(result.model_path, MemoryPolicy())
    frames, truth = simulate_sequences(1, 8, seed=9, style="real-like", size=64)

    def reference(frames_thw3):  # a stand-in segmenter: the truth, softened, with one frame wrong
        probs = np.eye(7, dtype=np.float32)[truth[0]].transpose(0, 3, 1, 2) * 0.9 + 0.1 / 7
        probs[3] = probs[3, ::-1]
        return probs

    cfg = PseudoLabelConfig(threshold=0.3, key_every=4, min_kept=0.2)
    labels = pseudo_label_sequence(backend, frames[0], reference(frames[0]), cfg)
    assert labels.keep[0].all()  # key frames agree with themselves
    assert labels.kept_fraction[3] < 0.5  # the broken reference frame disagrees with propagation
    names = [f"{i:03d}" for i in range(8)]
    summary = write_pseudo_dataset(str(tmp_path / "pseudo"), {"simseq": (frames[0], names, labels)}, cfg)
    index = folder_index(str(tmp_path / "pseudo"))
    images, masks = load_frames(index)
    assert len(images) == summary["frames_written"] == int(labels.frame_kept.sum())
    assert set(index.sequences) == {"simseq"}
    keep = np.array(Image.open(tmp_path / "pseudo" / "keep" / "simseq" / "000.png"))
    assert keep.shape == (64, 64) and set(np.unique(keep)) <= {0, 255} and (keep == 255).all()
    assert json.loads((tmp_path / "pseudo" / "pseudo_labels.json").read_text())["threshold"] == 0.3


def test_evaluate_cli_on_a_folder_of_sequences(trained, tmp_path):
    _, result = trained
    frames, truth = simulate_sequences(2, 5, seed=3, style="real-like", size=64)
    names = [f"seq{s}/{t:03d}" for s in range(2) for t in range(5)]
    write_folder_dataset(str(tmp_path / "data"), frames.reshape(-1, 64, 64, 3), truth.reshape(-1, 64, 64), names)
    out = tmp_path / "eval.json"
    onnx_dir = result.graphs["segment"].parent
    args = ["propagate", "evaluate", "--model", str(onnx_dir), "--data", str(tmp_path / "data"), "--layout", "folder"]
    run = CliRunner().invoke(app, [*args, "--out", str(out), "--size", "64"])
    assert run.exit_code == 0, run.output
    report = json.loads(out.read_text())
    assert set(report["sequences"]) == {"seq0", "seq1"}
    assert 0 <= report["mean"]["J&F"] <= 1 and 0 <= report["copy_first_mean"]["J&F"] <= 1
    for scores in report["sequences"].values():  # the DAVIS statistics per object, and on the console
        objects = scores["per_object"]
        assert set(objects) == set(scores["per_object_J"]) == {str(o) for o in scores["objects"]}
        assert all(
            0 <= o["J_recall"] <= 1 and 0 <= o["false_positive_frames"] <= o["absent_frames"] <= 4
            for o in objects.values()
        )
        assert scores["J_recall"] == pytest.approx(np.mean([o["J_recall"] for o in objects.values()]))
        assert f"  object {next(iter(objects))}: J&F" in run.output
    for name in ("seq0", "seq1"):  # one picture a sequence, beside the report: 5 frames of 3 panels of 64 px
        path = Path(report["pictures"][name])
        assert path.parent == tmp_path / "eval_pictures"
        assert np.asarray(Image.open(path)).shape == (5 * 64, 3 * 64, 3)
    flipped = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "flip.json"), "--size", "64", "--flip-average"])
    assert flipped.exit_code == 0, flipped.output
    flip_report = json.loads((tmp_path / "flip.json").read_text())
    assert flip_report["policy"]["flip_average"] is True and report["policy"]["flip_average"] is False
    assert 0 <= flip_report["mean"]["J&F"] <= 1 and flip_report["copy_first_mean"] == report["copy_first_mean"]
    bounded = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "min.json"), "--size", "64", "--min-area", "0.2"])
    assert bounded.exit_code == 0, bounded.output
    assert json.loads((tmp_path / "min.json").read_text())["policy"]["min_area"] == 0.2
    too_large = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x.json"), "--min-area", "0.9"])
    assert too_large.exit_code == 2 and "--min-area" in too_large.output
    # the graphs and the checkpoint of one model as a two-member ensemble: the same masks up to rounding
    both = [*args, "--model", str(result.model_path), "--out", str(tmp_path / "both.json"), "--size", "64"]
    assert CliRunner().invoke(app, both).exit_code == 0
    ensemble = json.loads((tmp_path / "both.json").read_text())
    assert ensemble["model"] == [str(onnx_dir), str(result.model_path)]
    assert ensemble["mean"]["J&F"] == pytest.approx(report["mean"]["J&F"], abs=0.02)
    missing = CliRunner().invoke(app, [*args[:4], str(tmp_path / "nope.pt"), *args[4:]])
    assert missing.exit_code == 2 and "nope.pt" in missing.output


def test_evaluate_cli_with_key_frame_tuning(trained, tmp_path):
    _, result = trained
    frames, truth = simulate_sequences(1, 4, seed=5, style="real-like", size=64)
    write_folder_dataset(str(tmp_path / "data"), frames[0], truth[0], [f"seq0/{t:03d}" for t in range(4)])
    args = ["propagate", "evaluate", "--data", str(tmp_path / "data"), "--layout", "folder", "--tune-steps", "2"]
    out = tmp_path / "tuned.json"
    run = CliRunner().invoke(app, [*args, "--model", str(result.model_path), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert "key-frame tuning step 2/2" in run.output
    report = json.loads(out.read_text())
    assert report["key_frame_tuning"]["steps"] == 2 and 0 <= report["mean"]["J&F"] <= 1
    onnx = CliRunner().invoke(app, [*args, "--model", str(result.graphs["segment"].parent)])
    assert onnx.exit_code == 2 and "--tune-steps" in onnx.output and ".pt" in onnx.output


def test_evaluate_and_run_cli_with_a_segmenter_guide(trained, tmp_path):
    from training.export import export_segmenter
    from training.models.unet import Segmenter, UNetConfig

    _, result = trained
    torch.manual_seed(0)
    segmenter = export_segmenter(Segmenter(UNetConfig(base_width=4, depth=2)), tmp_path / "seg.onnx", 64)
    frames, truth = simulate_sequences(1, 4, seed=6, style="real-like", size=64)
    write_folder_dataset(str(tmp_path / "data"), frames[0], truth[0], [f"seq0/{t:03d}" for t in range(4)])
    args = ["propagate", "evaluate", "--model", str(result.model_path), "--data", str(tmp_path / "data")]
    args += ["--layout", "folder", "--segmenter", str(segmenter)]
    plain, guided = tmp_path / "plain.json", tmp_path / "guided.json"
    assert CliRunner().invoke(app, [*args, "--out", str(plain)]).exit_code == 0
    run = CliRunner().invoke(app, [*args, "--guide-weight", "0.5", "--out", str(guided)])
    assert run.exit_code == 0, run.output
    assert "segmenter alone" in run.output
    plain_report, guided_report = json.loads(plain.read_text()), json.loads(guided.read_text())
    assert guided_report["segmenter_guide_weight"] == 0.5 and plain_report["segmenter_guide_weight"] == 0.0
    assert guided_report["segmenter_only_mean"] == plain_report["segmenter_only_mean"]
    assert 0 <= guided_report["mean"]["J&F"] <= 1
    no_segmenter = CliRunner().invoke(app, [*args[:-2], "--guide-weight", "0.5"])
    assert no_segmenter.exit_code == 2 and "--segmenter" in no_segmenter.output

    video = tmp_path / "video"
    video.mkdir()
    for t, frame in enumerate(frames[0]):
        Image.fromarray(frame).save(video / f"{t:03d}.png")
    base = ["propagate", "run", "--model", str(result.model_path), "--input", str(video), "--out", str(tmp_path / "o")]
    run = CliRunner().invoke(app, [*base, "--segmenter", str(segmenter), "--guide-weight", "1"])
    assert run.exit_code == 0, run.output
    assert len(list((tmp_path / "o").glob("*.png"))) == 4


def test_evaluate_cli_on_vocalfolds(trained, tmp_path, vocalfolds_root):
    _, result = trained
    out = tmp_path / "vf.json"
    args = ["propagate", "evaluate", "--model", str(result.model_path), "--data", str(vocalfolds_root)]
    run = CliRunner().invoke(app, [*args, "--sequence", "seq3", "--size", "64", "--out", str(out)])
    assert run.exit_code == 0, run.output
    report = json.loads(out.read_text())
    assert report["sequences"]["patient1/seq3"]["frames"] == 26
    assert report["copy_first_mean"]["J"] == pytest.approx(0.42, abs=0.05)  # the brief's copy-first figure
    # void pixels left out (DAVIS): seq3 has few; J can only rise, as a union loses pixels and no intersection does
    void = report["sequences"]["patient1/seq3"]["void_excluded"]
    assert 0 < void["void_fraction"] < 0.05 and "void pixels" in run.output
    assert void["J"] >= report["sequences"]["patient1/seq3"]["J"] and report["void_excluded_mean"]["J&F"] == void["J&F"]


def test_run_cli_on_a_video_and_a_volume(trained, tmp_path):
    _, result = trained
    frames, truth = simulate_sequences(1, 5, seed=4, style="real-like", size=80)  # resized to 64 and back
    video = tmp_path / "video"
    video.mkdir()
    for t, frame in enumerate(frames[0]):
        Image.fromarray(frame).save(video / f"{t:03d}.png")
    Image.fromarray(truth[0, 2]).save(tmp_path / "key.png")
    base = ["propagate", "run", "--model", str(result.model_path), "--size", "64"]
    run = CliRunner().invoke(
        app,
        [
            *base,
            "--input",
            str(video),
            "--mask",
            str(tmp_path / "key.png"),
            "--key-index",
            "-1",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert run.exit_code == 0, run.output
    written = sorted((tmp_path / "o").glob("*.png"))
    assert len(written) == 5 and np.array(Image.open(written[2])).shape == (80, 80)

    volume = simulate_volume(1, shape=(48, 48, 10))
    image_path, label_path = write_case(tmp_path / "ct", volume)
    run = CliRunner().invoke(
        app, [*base, "--input", str(image_path), "--labels", str(label_path), "--out", str(tmp_path / "v")]
    )
    assert run.exit_code == 0, run.output
    labels, spacing = read_nifti(tmp_path / "v" / f"{volume.name}.nii.gz")
    assert labels.shape == volume.hu.shape and spacing == pytest.approx(volume.spacing)
    scores = json.loads((tmp_path / "v" / f"{volume.name}_scores.json").read_text())
    assert set(scores["organs"]) == {"1", "2", "3", "5", "13"} and 0 <= scores["organs"]["1"]["nsd_2mm"] <= 1
    bad = CliRunner().invoke(
        app,
        [*base, "--input", str(tmp_path / "none.nii.gz"), "--labels", str(label_path), "--out", str(tmp_path / "v")],
    )
    assert bad.exit_code == 2 and "none.nii.gz" in bad.output


def test_evaluate_cli_on_ct_volumes(trained, tmp_path):
    _, result = trained
    root = tmp_path / "ct"
    for seed in (1, 2):
        write_case(root, simulate_volume(seed, shape=(48, 48, 10)))
    args = ["propagate", "evaluate", "--model", str(result.model_path), "--data", str(root), "--layout", "flare22"]
    args += ["--size", "64"]
    run = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ct.json")])
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "ct.json").read_text())
    assert set(report["volumes"]) == {"sim_1", "sim_2"} and report["policy"]["min_area"] == 0.0  # the CT default
    measures = ("dice", "nsd_2mm", "copy_key_slice_dice", "copy_key_slice_nsd_2mm")
    pairs = [scores for volume in report["volumes"].values() for scores in volume["organs"].values()]
    assert len(pairs) >= 6 and all(0 <= scores[m] <= 1 for scores in pairs for m in measures)
    assert report["mean"]["dice"] == pytest.approx(np.mean([scores["dice"] for scores in pairs]))
    for volume in report["volumes"].values():
        assert volume["slices"] == 10 and volume["organs"]["1"]["copy_key_slice_dice"] < 1  # the liver changes
    labelled = np.nonzero(simulate_volume(1, shape=(48, 48, 10)).labels.any(axis=(0, 1)))[0]
    assert report["volumes"]["sim_1"]["key_slice"] == labelled[len(labelled) // 2]
    assert "organ 1 (liver): Dice" in run.output and "mean over" in run.output
    picture = np.asarray(Image.open(report["pictures"]["sim_1"]))  # 6 slices: image, truth, propagation
    assert picture.shape == (6 * 48, 3 * 48, 3)
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one.json"), "--sequence", "sim_2"])
    assert one.exit_code == 0 and set(json.loads((tmp_path / "one.json").read_text())["volumes"]) == {"sim_2"}
    unknown = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x.json"), "--sequence", "sim_9"])
    assert unknown.exit_code == 2 and "sim_9" in unknown.output
    guided = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x.json"), "--segmenter", "seg.onnx"])
    assert guided.exit_code == 2 and "--segmenter apply to video" in guided.output
    unlabelled = simulate_volume(3, shape=(48, 48, 10))
    unlabelled.labels = None
    write_case(root, unlabelled)
    missing = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x.json")])
    assert missing.exit_code == 2 and "sim_3" in missing.output and "labelsTr" in missing.output
    elsewhere = [*args[:5], str(tmp_path / "nothing"), *args[6:], "--out", str(tmp_path / "x.json")]
    empty = CliRunner().invoke(app, elsewhere)
    assert empty.exit_code == 2 and "imagesTr" in empty.output
    other = CliRunner().invoke(app, [*args[:7], "nifti", *args[8:], "--out", str(tmp_path / "x.json")])
    assert other.exit_code == 2 and "flare22" in other.output


def test_pseudo_label_cli_on_vocalfolds(trained, tmp_path, vocalfolds_root):
    from training.export import export_segmenter
    from training.models.unet import Segmenter, UNetConfig

    _, result = trained
    segmenter = export_segmenter(Segmenter(UNetConfig(base_width=4, depth=2)), tmp_path / "seg.onnx", 64)
    out = tmp_path / "pseudo"
    args = ["propagate", "pseudo-label", "--model", str(result.model_path), "--segmenter", str(segmenter)]
    args += ["--data", str(vocalfolds_root), "--sequence", "seq3", "--out", str(out), "--size", "64"]
    run = CliRunner().invoke(app, [*args, "--threshold", "0.99", "--min-kept", "0", "--key-every", "5"])
    assert run.exit_code == 0, run.output
    summary = json.loads((out / "pseudo_labels.json").read_text())
    assert summary["frames_written"] == 26 and summary["threshold"] == 0.99
    check = summary["truth_check"]["patient1/seq3"]
    assert 0 <= check["coverage"] <= 1 and 0 <= check["reference_accuracy"] <= 1
    images, masks = load_frames(folder_index(str(out)))
    assert images.shape == (26, 64, 64, 3) and masks.shape == (26, 64, 64)
