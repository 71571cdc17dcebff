"""The propagation benchmark keeps vocalfolds seq4 out of what it trains: the network and the guide's segmenter."""

from __future__ import annotations

from pipelines.bench_propagate import GUIDE_WEIGHT, bench_config, guide_segmenter_config


def test_seq4_is_held_out_of_both_trained_models(tmp_path):
    (tmp_path / "img").mkdir()
    network = bench_config(tmp_path, runs_dir=str(tmp_path / "runs"))
    segmenter = guide_segmenter_config(tmp_path, runs_dir=str(tmp_path / "runs"))
    assert network.data.real.sequences == segmenter.source.sequences == ["seq1", "seq2", "seq3"]
    assert network.val.sequences == segmenter.val.sequences == ["seq4"]
    assert segmenter.source.size == network.data.size == 256 and 0 < GUIDE_WEIGHT < 1
    assert bench_config(tmp_path / "missing").data.real is None  # no vocalfolds: simulator only
