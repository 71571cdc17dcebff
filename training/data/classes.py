"""The label sets: laryngoscopy (shared by the simulator, the real-data loaders and every exported model by default)
and FLARE22's abdominal organs (CT volumes, `endoflow patient adapt` with `data.layout: flare22`).

Laryngoscopy indices match the vocalfolds dataset (Laves et al., IJCARS 2019) so simulated and real label maps mix
freely; FLARE22 indices are its labelsTr/ values, so a segmenter's output is the challenge's own numbering.
"""

from typing import Literal

CLASS_NAMES: tuple[str, ...] = (
    "void",
    "vocal_folds",
    "other_tissue",
    "glottal_space",
    "pathology",
    "surgical_tool",
    "intubation",
)
NUM_CLASSES = len(CLASS_NAMES)
VOID, VOCAL_FOLDS, OTHER_TISSUE, GLOTTAL_SPACE, PATHOLOGY, SURGICAL_TOOL, INTUBATION = range(NUM_CLASSES)
# A label map's value for "no label here" (pixels a pseudo-label's keep mask drops): losses and metrics skip it.
IGNORE_INDEX = 255

# Colours for overlays and label-map previews (RGB).
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (255, 255, 255),
    (200, 80, 80),
    (40, 40, 200),
    (240, 200, 0),
    (0, 200, 80),
    (200, 0, 200),
)

# FLARE22 (MICCAI 2022 abdominal organ challenge) labelsTr/ values 0..13.
FLARE22_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "liver",
    "right_kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior_vena_cava",
    "right_adrenal_gland",
    "left_adrenal_gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left_kidney",
)

LabelSet = Literal["laryngoscopy", "flare22"]
LABEL_SETS: dict[str, tuple[str, ...]] = {"laryngoscopy": CLASS_NAMES, "flare22": FLARE22_CLASS_NAMES}


def class_names(label_set: str, num_classes: int) -> tuple[str, ...]:
    """The names of a model's first `num_classes` classes of its label set; ValueError when the set has fewer."""
    names = LABEL_SETS[label_set]
    if not 1 <= num_classes <= len(names):
        raise ValueError(f"num_classes {num_classes}: label set {label_set} has classes 0..{len(names) - 1}")
    return names[:num_classes]
