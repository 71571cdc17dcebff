"""The propagation benchmark keeps vocalfolds seq4 out of what it trains (the network, its seeds and the guide's
segmenter), scores held-out sequences apart, and scores an ensemble of seeds beside each member."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.bench_propagate import (
    GUIDE_WEIGHT,
    bench_config,
    bench_propagate,
    ct_volumes,
    ensemble_fps,
    ensemble_of_seeds,
    guide_segmenter_config,
    held_out_mean,
    jf_summary,
    memory_sweep,
    trained_members,
)
from training.config import load_config
from training.models.propagation.network import PropagationNet
from training.propagate.config import PropagateJobConfig
from training.propagate.inference import TorchBackend
from training.propagate.models import save_model


def test_seq4_is_held_out_of_both_trained_models(tmp_path):
    (tmp_path / "img").mkdir()
    network = bench_config(tmp_path, runs_dir=str(tmp_path / "runs"))
    segmenter = guide_segmenter_config(tmp_path, runs_dir=str(tmp_path / "runs"))
    assert network.data.real.sequences == segmenter.source.sequences == ["seq1", "seq2", "seq3"]
    assert network.val.sequences == segmenter.val.sequences == ["seq4"]
    assert segmenter.source.size == network.data.size == 256 and 0 < GUIDE_WEIGHT < 1
    assert bench_config(tmp_path / "missing").data.real is None  # no vocalfolds: simulator only


def test_an_ensemble_member_differs_from_the_bench_network_only_by_seed_and_name(tmp_path):
    (tmp_path / "img").mkdir()
    first, second = bench_config(tmp_path), bench_config(tmp_path, seed=2)
    assert (first.name, first.compute.seed) == ("propagate-bench", 0)
    assert (second.name, second.compute.seed) == ("propagate-bench-seed2", 2)
    same = {"name": "x", "compute": first.compute.model_copy(update={"seed": 0})}
    assert first.model_copy(update=same) == second.model_copy(update=same)


def test_the_pretrained_key_encoder_bench_differs_only_by_its_key_encoder_and_name(tmp_path):
    (tmp_path / "img").mkdir()
    scratch, lite0 = bench_config(tmp_path), bench_config(tmp_path, seed=1, key_encoder="lite0-imagenet")
    assert (lite0.name, lite0.model.key_encoder) == ("propagate-bench-lite0-imagenet-seed1", "lite0-imagenet")
    same = {"name": "x", "compute": scratch.compute, "model": scratch.model}
    assert lite0.model_copy(update=same) == scratch.model_copy(update=same)


def test_an_older_bench_checkpoint_is_scored_with_a_notice_not_retrained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "runs" / "artifacts" / "propagate-bench.pt"
    path.parent.mkdir(parents=True)
    torch.save({"config": {"compute": {"epochs": 30}}}, path)
    assert [p.resolve() for p in trained_members(None, range(1))] == [path]
    said = capsys.readouterr().out
    assert f"trained 30 epochs, the bench now trains {bench_config(None).compute.epochs}" in said
    assert "delete it" in said


def test_held_out_mean_skips_the_trained_on_sequences():
    scores = {"patient1/seq1": 0.9, "patient1/seq3": 0.8, "patient1/seq4": 0.5, "patient2/seq4b": 0.7}
    assert held_out_mean(scores, ["seq1", "seq3"]) == pytest.approx(0.6)
    assert held_out_mean(scores, ["seq1", "seq3", "seq4", "seq4b"]) is None


def test_an_ensemble_needs_the_real_sequences_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match="vocalfolds"):
        bench_propagate(tmp_path / "out.json", None, tmp_path / "no-data", ensemble=3)
    with pytest.raises(ValueError, match="ensemble 0"):
        bench_propagate(tmp_path / "out.json", None, None, ensemble=0)
    assert not (tmp_path / "out.json").exists()


def test_ensemble_of_seeds_scores_the_ensemble_and_each_member(tmp_path):
    cfg = load_config(
        PropagateJobConfig, None, ["model={key_dim: 8, value_dim: 8, c4: 8, c8: 8, c16: 8, decoder_width: 8}"]
    )
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_model(PropagationNet(cfg.model), cfg, tmp_path / f"member{seed}.pt"))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    truth = np.zeros((5, 32, 32), np.uint8)
    truth[:, :, :16] = 1  # two objects: an untrained network labels some of their pixels, so the scores are not 0
    truth[:, :6, 20:] = 2
    sequences = {"p/seq1": (frames, truth), "p/seq4": (frames[:, :, ::-1].copy(), truth[:, :, ::-1].copy())}
    policy = PropagateJobConfig().memory

    twice = ensemble_of_seeds([paths[0], paths[0]], sequences, policy, ["seq1"])
    assert twice["members"] == [str(paths[0])] * 2
    assert twice["sequences"] == twice["each_member"][0]["sequences"]  # a model twice is that model
    assert twice["held_out_mean_jf"] == twice["sequences"]["p/seq4"]

    assert 0 < twice["sequences"]["p/seq1"] < 1

    both = ensemble_of_seeds(paths, sequences, policy, ["seq1"])
    first, second = (member["sequences"] for member in both["each_member"])
    assert first == twice["sequences"] and second != first  # members scored alone, each with its own weights
    assert both["sequences"] not in (first, second)  # the ensemble is neither member

    off = ensemble_of_seeds(paths, sequences, policy.model_copy(update={"min_area": 0.0}), ["seq1"])
    assert off["min_area_off"] == {key: off[key] for key in ("mean_jf", "held_out_mean_jf", "sequences")}
    bounded = ensemble_of_seeds(paths, sequences, policy.model_copy(update={"min_area": 0.3}), ["seq1"])
    assert bounded["min_area_off"]["sequences"] == off["sequences"] != bounded["sequences"]

    graphs = tmp_path / "graphs"
    graphs.mkdir()
    assert ensemble_fps(paths, graphs, frames, truth[0], policy, threads=1) > 0
    assert sorted(f.name for f in graphs.glob("*.segment.onnx")) == ["member0.segment.onnx", "member1.segment.onnx"]


def test_memory_sweep_scores_each_memory_length_and_a_long_sequence_tells_them_apart():
    cfg = load_config(
        PropagateJobConfig, None, ["model={key_dim: 8, value_dim: 8, c4: 8, c8: 8, c16: 8, decoder_width: 8}"]
    )
    torch.manual_seed(0)
    backend = TorchBackend(PropagationNet(cfg.model).eval(), cfg.memory.top_k)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (30, 32, 32, 3), dtype=np.uint8)  # every 2nd of 30: at most 15 entries
    truth = np.zeros((30, 32, 32), np.uint8)
    truth[:, :, :16] = 1
    truth[:, :6, 20:] = 2
    sequences = {"p/seq1": (frames, truth), "p/seq4": (frames[:12], truth[:12])}  # seq4: 6 entries at most

    sweep = memory_sweep(backend, sequences, cfg.memory, ["seq1"])
    assert list(sweep) == ["8", "16", "32"]
    assert sweep["32"] == jf_summary(backend, sequences, cfg.memory.model_copy(update={"max_memory": 32}), ["seq1"])
    assert sweep["8"]["sequences"]["p/seq1"] != sweep["16"]["sequences"]["p/seq1"]  # 8 forgets the oldest
    assert sweep["16"]["sequences"]["p/seq1"] == sweep["32"]["sequences"]["p/seq1"]  # neither fills up
    assert sweep["8"]["held_out_mean_jf"] == sweep["32"]["held_out_mean_jf"]  # too short to fill any memory


def test_ct_volumes_scores_the_simulator_volumes_without_min_area():
    cfg = load_config(
        PropagateJobConfig, None, ["model={key_dim: 8, value_dim: 8, c4: 8, c8: 8, c16: 8, decoder_width: 8}"]
    )
    torch.manual_seed(0)
    backend = TorchBackend(PropagationNet(cfg.model).eval(), cfg.memory.top_k)
    assert cfg.memory.min_area > 0  # the video default, which the CT set must not use
    scored = ct_volumes(backend, cfg.memory, 32, trained_volumes=4, seeds=range(5000, 5002))
    assert scored["seeds"] == [5000, 5001] and scored["trained_volumes"] == 4
    assert list(scored["volumes"]) == ["sim_5000", "sim_5001"] and scored["policy"]["min_area"] == 0.0
    organs = [s for volume in scored["volumes"].values() for s in volume["organs"].values()]
    assert len(organs) == 10 and scored["mean"]["dice"] == pytest.approx(np.mean([s["dice"] for s in organs]))
    assert set(scored["per_organ"]) == {"1", "2", "3", "5", "13"} and scored["slices_per_second"] > 0
