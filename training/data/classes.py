"""The label set shared by the simulator, the real-data loaders and every exported model.

Indices match the vocalfolds dataset (Laves et al., IJCARS 2019) so simulated and real label maps mix freely.
"""

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
