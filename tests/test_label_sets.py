"""Label sets beyond laryngoscopy: a FLARE22 (organ) segmenter names its 14 classes in its ONNX metadata and scores,
a folder set of organ labels round-trips through classes.json, and an old checkpoint's model section (before
label_set existed) still matches a laryngoscopy config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.data.classes import CLASS_NAMES, FLARE22_CLASS_NAMES
from training.data.folders import DataError, folder_index, load_frames, write_folder_dataset
from training.data.volumes import ORGANS
from training.export import segmentation_metadata
from training.loop import saved_model_section
from training.models.unet import Segmenter, UNetConfig
from training.segment.predict import model_class_names

TINY = {"base_width": 4, "depth": 2, "blocks_per_level": 1}


def test_a_label_set_sets_the_class_count_and_names() -> None:
    assert UNetConfig().num_classes == len(CLASS_NAMES) == 7
    organs = UNetConfig(label_set="flare22", **TINY)
    assert organs.num_classes == 14 and organs.class_names == FLARE22_CLASS_NAMES
    assert UNetConfig(label_set="flare22", num_classes=6).class_names[-1] == "aorta"
    with pytest.raises(ValueError, match="label set laryngoscopy has classes 0..6"):
        UNetConfig(num_classes=14)
    model = Segmenter(organs, pretrained=False)
    assert json.loads(segmentation_metadata(model, 64, None)["endoflow.class_names"]) == list(FLARE22_CLASS_NAMES)
    assert model_class_names(model) == FLARE22_CLASS_NAMES
    assert all(FLARE22_CLASS_NAMES[label] == name for label, name in ORGANS.items())


def test_organ_labels_round_trip_through_a_folder_set(tmp_path: Path) -> None:
    images = np.zeros((2, 8, 8, 3), np.uint8)
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[1, 2:4, 2:4] = 13
    with pytest.raises(ValueError, match="expected indices below 7"):
        write_folder_dataset(str(tmp_path / "larynx"), images, masks)
    write_folder_dataset(str(tmp_path / "organs"), images, masks, class_names=FLARE22_CLASS_NAMES)
    _, loaded = load_frames(folder_index(str(tmp_path / "organs")))
    np.testing.assert_array_equal(loaded, masks)

    (tmp_path / "organs" / "classes.json").write_text(json.dumps({"0": "void", "13": "left_kidney"}))
    with pytest.raises(DataError, match="classes.json: mixes the class names of several label sets"):
        folder_index(str(tmp_path / "organs"))


def test_a_checkpoint_from_before_label_sets_matches_a_laryngoscopy_config() -> None:
    old = UNetConfig(**TINY).model_dump(mode="json")
    old.pop("label_set")
    assert saved_model_section(old, UNetConfig) == UNetConfig(**TINY).model_dump(mode="json")
