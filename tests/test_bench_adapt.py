"""The adaptation ladder's logic: what every rung trains on (target labels only for the oracle), how they chain,
and the gap-closed arithmetic. The rungs themselves are the jobs tested in test_adapt_job / test_translator."""

import pytest
from typer.testing import CliRunner

from pipelines.bench_adapt import RUNGS, BenchAdaptConfig, gap_closed, plan
from pipelines.cli import app
from training.adapt.config import AdaptJobConfig
from training.segment.config import SegmentJobConfig
from training.style.translator_config import TranslatorJobConfig


def test_gap_closed():
    assert gap_closed({"source_only": 0.2, "fda": 0.4, "irb": 0.5, "oracle": 0.6}) == pytest.approx(0.75)
    assert gap_closed({"source_only": 0.2, "fda": 0.1, "oracle": 0.6}) == pytest.approx(-0.25)  # adaptation hurt
    assert gap_closed({"source_only": 0.2, "oracle": 0.6}) is None
    assert gap_closed({"source_only": 0.6, "fda": 0.7, "oracle": 0.5}) is None  # no gap to close


@pytest.mark.parametrize("real", [None, "vocalfolds"])
def test_only_the_oracle_reads_target_labels(real, tmp_path):
    cfg = BenchAdaptConfig(
        real_data=str(tmp_path) if real else None, runs_dir=str(tmp_path / "runs"), irb_style="translator"
    )
    ladder = plan(cfg)
    assert [name for name in ladder.jobs if name != "translator_training"] == list(RUNGS)
    # The translator trains after the source-only model (its frozen segmenter) and before its first use.
    names = list(ladder.jobs)
    assert names.index("source_only") < names.index("translator_training") < names.index("translator")
    assert not ladder.target.labelled and ladder.oracle_train.labelled and ladder.source.kind == "sim"
    for name, job in ladder.jobs.items():
        if name == "oracle":
            assert isinstance(job, SegmentJobConfig) and job.source == ladder.oracle_train
        elif isinstance(job, SegmentJobConfig):
            assert job.source == ladder.source and job.source.labelled  # source_only: simulator frames
        else:
            assert job.target == ladder.target and not job.target.labelled
            assert job.source == ladder.source
        if isinstance(job, AdaptJobConfig):
            assert job.teacher_checkpoint.endswith("bench-adapt-source_only") and job.val is None
            expected_style = "fda" if name == "fda" else "translator"
            assert job.style.method == expected_style
            assert job.irb.enabled == (name in ("irb", "irb_pseudo")) and job.pseudo.enabled == (name == "irb_pseudo")
            if expected_style == "translator":
                assert job.style.translator == str(ladder.jobs["translator_training"].generator_file)
    assert isinstance(ladder.jobs["translator_training"], TranslatorJobConfig)
    assert ladder.jobs["translator_training"].segmenter_checkpoint.endswith("bench-adapt-source_only")
    if real:
        assert ladder.target.sequences == ["seq1", "seq2", "seq3"] and ladder.evaluate.sequences == ["seq4"]
    else:
        assert ladder.evaluate.seed != ladder.target.seed  # held-out frames


def test_subset_of_rungs_and_bad_splits(tmp_path):
    ladder = plan(BenchAdaptConfig(rungs=["source_only", "fda", "oracle"], runs_dir=str(tmp_path)))
    assert list(ladder.jobs) == ["source_only", "fda", "oracle"]  # no translator trained when no rung needs it
    with pytest.raises(ValueError, match="overlap"):
        plan(BenchAdaptConfig(real_data=str(tmp_path), train_sequences=["seq1"], eval_sequences=["seq1"]))
    fda_under_irb = plan(BenchAdaptConfig(rungs=["source_only", "irb"], runs_dir=str(tmp_path)))
    assert list(fda_under_irb.jobs) == ["source_only", "irb"] and fda_under_irb.jobs["irb"].style.method == "fda"
    result = CliRunner().invoke(app, ["bench", "adapt", "--set", "rungs=[nope]"])
    assert result.exit_code == 2 and "rungs" in result.output
