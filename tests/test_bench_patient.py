"""`endoflow bench patient`'s plan: which labels and frames every row trains on (never the eval sequence), how the
rows chain, and the message when the propagation model is missing. Nothing is trained or decoded here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.bench_patient import BenchPatientConfig, plan, summary, write_labels, zero_label_row
from pipelines.cli import app

FRAMES = {"seq1": 5, "seq2": 4, "seq3": 3, "seq4": 6}


@pytest.fixture
def vocalfolds(tmp_path: Path) -> Path:
    """The vocalfolds layout with empty frame files: the plan only lists them."""
    root = tmp_path / "vocalfolds"
    for sequence, count in FRAMES.items():
        for kind in ("img", "annot"):
            folder = root / kind / "patient1" / sequence
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{2 * i + 1:04d}.png").write_bytes(b"")
    return root


def bench(vocalfolds: Path, tmp_path: Path, **fields) -> BenchPatientConfig:
    return BenchPatientConfig(real_data=str(vocalfolds), runs_dir=str(tmp_path / "runs"), **fields)


def test_the_eval_sequence_is_never_a_training_input(vocalfolds, tmp_path) -> None:
    bench_plan = plan(bench(vocalfolds, tmp_path))
    assert list(bench_plan.jobs) == [
        "oracle",
        "k1_labels",
        "k1_propagated",
        "k1_propagated_lite0-imagenet",
        "k3_labels",
        "k3_propagated",
    ]
    assert bench_plan.evaluate.sequences == ["seq4"] and bench_plan.evaluate.patients == ["patient1"]
    for copies in bench_plan.labels.values():
        for source, destination in copies.items():
            assert "seq4" not in source and "seq4" not in str(destination)
    for row, job in bench_plan.jobs.items():
        assert job.data.sequences == ["patient1/seq1", "patient1/seq2", "patient1/seq3"], row
        assert job.data.layout == "vocalfolds" and job.val is None, row  # seq4 is not even scored during training
        assert "seq4" not in json.dumps(job.model_dump(mode="json")), row


def test_each_row_reads_its_k_labelled_frames_and_chains_on_the_labels_only_row(vocalfolds, tmp_path) -> None:
    bench_plan = plan(bench(vocalfolds, tmp_path))
    names = {key: sorted(f"{Path(s).parent.name}/{Path(s).name}" for s in c) for key, c in bench_plan.labels.items()}
    assert names["k1"] == ["seq1/0001.png", "seq2/0001.png", "seq3/0001.png"]  # the first labelled frame of each
    assert names["k3"] == sorted(
        ["seq1/0001.png", "seq1/0005.png", "seq1/0009.png", "seq2/0001.png", "seq2/0005.png", "seq2/0007.png"]
        + ["seq3/0001.png", "seq3/0003.png", "seq3/0005.png"]
    )
    assert len(names["all"]) == 12
    jobs = bench_plan.jobs
    assert not jobs["oracle"].pseudo.enabled and jobs["oracle"].labelled_copies == 1
    assert not jobs["k1_labels"].pseudo.enabled and jobs["k1_labels"].labelled_copies == 4  # 3 frames ≈ 12
    propagated = jobs["k1_propagated"]
    assert propagated.pseudo.enabled and propagated.segmenter.endswith("bench-patient-k1_labels.onnx")
    assert propagated.init_checkpoint.endswith("ray/bench-patient-k1_labels")
    assert propagated.data.labels == jobs["k1_labels"].data.labels
    assert propagated.propagation_model.endswith("runs/artifacts/propagate-bench.pt")
    pretrained = jobs["k1_propagated_lite0-imagenet"]
    assert pretrained.model.encoder == "lite0-imagenet" and pretrained.init_checkpoint is None
    write_labels(bench_plan)
    assert (tmp_path / "runs" / "labels-k1" / "patient1" / "seq2" / "0001.png").is_file()


def test_overrides_reach_every_row_last(vocalfolds, tmp_path) -> None:
    jobs = plan(bench(vocalfolds, tmp_path, set=["pseudo.threshold=0.2", "compute.epochs=3"])).jobs
    assert {job.pseudo.threshold for job in jobs.values()} == {0.2}
    assert {job.compute.epochs for job in jobs.values()} == {3}


def test_overlapping_sequences_are_refused(vocalfolds, tmp_path) -> None:
    with pytest.raises(ValueError, match="overlap"):
        plan(bench(vocalfolds, tmp_path, eval_sequences=["seq3", "seq4"]))


def test_a_missing_propagation_model_names_the_command_that_trains_it(vocalfolds, tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    args = ["bench", "patient", "--real-data", str(vocalfolds), "--propagation-model", str(missing)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "patient.json")])
    assert result.exit_code == 2 and "make bench-propagate" in result.output, result.output
    assert not (tmp_path / "patient.json").exists()


def test_summary_and_the_zero_label_row(tmp_path) -> None:
    rows = {
        "oracle": {"vocal_folds_glottal_mean_dice": 0.8, "seconds": {"total": 300.0}},
        "k1_labels": {"vocal_folds_glottal_mean_dice": 0.5, "seconds": {"total": 200.0}},
        "k1_propagated": {"vocal_folds_glottal_mean_dice": 0.78, "seconds": {"total": 400.0}},
    }
    result = summary(rows)
    assert result["k1_propagated_over_oracle"] == pytest.approx(0.975) and result["target_k1_at_least_095_of_oracle"]
    assert result["k1_chain_seconds"] == 600.0 and result["target_k1_propagated_within_15_min"]
    assert "make bench-adapt" in zero_label_row(tmp_path / "absent.json")["missing"]
    report = tmp_path / "adapt.json"
    ladder = {"rungs": {"irb": {"vocal_folds_glottal_mean_dice": 0.47, "mean_dice": 0.21}}, "config": {"size": 128}}
    report.write_text(json.dumps(ladder))
    row = zero_label_row(report)
    assert row["vocal_folds_glottal_mean_dice"] == 0.47 and "128 px, encoder scratch" in row["from"]
