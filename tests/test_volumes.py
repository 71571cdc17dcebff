"""CT-like volumes: the simulator, NIfTI round trip in the FLARE22-like layout, clear errors, slice propagation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from training.data.folders import DataError
from training.data.volumes import ORGANS, case_index, read_case, read_nifti, simulate_volume, write_case
from training.models.propagation.network import PropagationConfig, PropagationNet
from training.propagate.inference import MemoryPolicy, TorchBackend, propagate_volume


def test_simulated_volume_round_trips_through_nifti(tmp_path):
    volume = simulate_volume(3, shape=(48, 40, 12), spacing=(1.5, 1.5, 5.0))
    assert set(np.unique(volume.labels)) == {0, *ORGANS}
    assert volume.hu.min() < -900 and 0 < np.median(volume.hu[volume.labels == 1]) < 120  # air and liver in HU
    write_case(tmp_path, volume)
    [(case, image_path, label_path)] = case_index(tmp_path)
    assert case == volume.name and label_path is not None
    back = read_case(image_path, label_path)
    assert back.spacing == pytest.approx((1.5, 1.5, 5.0))
    assert (back.labels == volume.labels).all()
    assert (back.hu == volume.hu).all()  # whole HU, stored as int16


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        read_nifti(tmp_path / "missing.nii.gz")
    broken = tmp_path / "imagesTr" / "broken_0000.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(DataError, match="broken_0000.nii.gz: cannot read"):
        read_nifti(broken)
    with pytest.raises(DataError, match="no volumes"):
        case_index(tmp_path / "empty")
    small, other = simulate_volume(0, shape=(16, 16, 4)), simulate_volume(1, shape=(16, 16, 5))
    image_path, _ = write_case(tmp_path / "a", small)
    _, label_path = write_case(tmp_path / "b", other)
    with pytest.raises(DataError, match="labels have shape"):
        read_case(image_path, label_path)


def test_propagation_through_slices_keeps_the_key_slice():
    torch.manual_seed(0)
    model = PropagationNet(PropagationConfig(key_dim=8, value_dim=16, c4=8, c8=16, c16=24, decoder_width=16))
    volume = simulate_volume(2, shape=(40, 40, 8))
    labels = propagate_volume(TorchBackend(model, None), volume.hu, {4: volume.labels[:, :, 4]}, MemoryPolicy(), 32)
    assert labels.shape == volume.hu.shape and labels.dtype == np.uint8
    assert (labels[:, :, 4] == volume.labels[:, :, 4]).mean() > 0.95  # only resizing to 32² and back differs
    with pytest.raises(ValueError, match="outside"):
        propagate_volume(TorchBackend(model, None), volume.hu, {9: volume.labels[:, :, 0]}, MemoryPolicy(), 32)


def test_ct_slices_join_the_training_pool():
    from training.propagate.config import ClipDataConfig
    from training.propagate.sequences import build_pools

    pools = build_pools(ClipDataConfig(size=32, sim_frames=0, sim_sequences=0, sim_volumes=1))
    [(frames, labels, max_gap)] = pools.sim.sequences
    assert frames.shape == (48, 32, 32, 3) and labels.shape == (48, 32, 32) and max_gap == 3
    assert set(np.unique(labels)) <= {0, *ORGANS} and len(pools.sim.static_images) == 12


def test_simulate_ct_cli_writes_a_flare22_folder_of_the_simulators_volumes(tmp_path):
    run = CliRunner().invoke(app, ["propagate", "simulate-ct", "--out", str(tmp_path), "--count", "2", "--seed", "7"])
    assert run.exit_code == 0, run.output
    cases = case_index(tmp_path)
    assert [name for name, _, _ in cases] == ["sim_7", "sim_8"] and all(label is not None for _, _, label in cases)
    written, expected = read_case(*cases[1][1:]), simulate_volume(8)
    np.testing.assert_array_equal(written.labels, expected.labels)
    np.testing.assert_array_equal(written.hu, expected.hu)
    assert written.spacing == pytest.approx(expected.spacing)
