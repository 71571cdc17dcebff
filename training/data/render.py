"""Two renderers of one label map: the simulator's own look ("sim") and a stand-in for real laryngoscopy
("real-like").

Why two: the project studies sim-to-real transfer, and the real target must be available offline and in any amount.
The gap between the styles is built to sit mostly in low spatial frequencies (palette, illumination, colour cast,
vignetting): the real-like palette is close to a per-channel gain of the sim palette, and lighting is smooth. The rest
is texture, vessels, specular highlights, blur and sensor noise. A segmenter trained on `sim` alone therefore loses
much on `real-like`, and Fourier domain adaptation (swapping low-frequency amplitude spectra) recovers much of it.

The real-like colours are read off the vocalfolds frames (Laves et al., "A Dataset of Laryngeal Endoscopic Images
with Comparative Study on Convolution Neural Network Based Semantic Segmentation", IJCARS 2019, CC BY 4.0):
pinkish-red tissue, paler vocal folds, a dark glottis, whitish lesions, a dark grainy laryngoscope rim.

Conventions: while rendering, images are planar float32 (3, H, W) in [0, 1] (per-plane arithmetic is several times
faster than on interleaved pixels); scalar fields are (H, W); the result is (H, W, 3) uint8.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage

from training.data.classes import (
    GLOTTAL_SPACE,
    INTUBATION,
    NUM_CLASSES,
    OTHER_TISSUE,
    PATHOLOGY,
    SURGICAL_TOOL,
    VOCAL_FOLDS,
    VOID,
)
from training.data.scene import Scene, SceneLayers, image_coordinates, scene_layers

STYLES: tuple[str, ...] = ("sim", "real-like")

# Per-class albedo, RGB in [0, 1], indexed by class. Sim: clean, simulator-like materials.
SIM_PALETTE = (
    np.array(
        [
            (0, 0, 0),  # void
            (232, 206, 192),  # vocal folds
            (222, 146, 138),  # other tissue
            (96, 88, 96),  # glottal space
            (248, 238, 226),  # pathology
            (150, 156, 168),  # surgical tool
            (196, 210, 226),  # intubation
        ],
        np.float32,
    )
    / 255.0
)
# Real-like: SIM_PALETTE shifted by about (-10, -50, -60), i.e. what red light and blood-filled mucosa do to every
# material. A per-channel shift is exactly what a low-frequency amplitude swap can undo; a per-class difference in
# contrast would not be.
REAL_PALETTE = (
    np.array(
        [
            (4, 3, 3),
            (222, 156, 132),
            (212, 96, 78),
            (86, 38, 36),
            (238, 188, 166),
            (140, 110, 104),
            (186, 160, 166),
        ],
        np.float32,
    )
    / 255.0
)

# Per-class strength of the real-like surface effects: rows are effects, columns classes.
_EFFECT_NAMES = ("mottle", "redness", "vessels", "streaks", "dots")
_SURFACE_EFFECTS = np.array(
    [
        # void, folds, tissue, glottis, pathology, tool, intubation
        (0.0, 0.16, 0.16, 0.16, 0.16, 0.0, 0.0),  # brightness mottling of mucosa
        (0.0, 0.16, 0.16, 0.0, 0.03, 0.0, 0.0),  # redder patches
        (0.0, 0.45, 1.0, 0.3, 0.0, 0.0, 0.0),  # vessels
        (0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0),  # elongated highlights on wet folds
        (0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0),  # point highlights
    ],
    np.float32,
)
# Blood absorbs green and blue far more than red.
_BLOOD_ABSORPTION = (0.15, 0.6, 0.55)

# Surface patterns, each a sum of smooth random octaves: per octave the feature size in anatomy units along
# (v, u) and its gain; then the divisor of the frame size giving the grid it is sampled on before upsampling.
_PATTERNS: dict[str, tuple[tuple[tuple[float, float, float], ...], int]] = {
    "mottle": (((0.8, 0.8, 1.0), (0.4, 0.4, 0.7), (0.2, 0.2, 0.45), (0.1, 0.1, 0.3)), 4),
    "redness": (((0.6, 0.6, 1.0), (0.3, 0.3, 0.6), (0.15, 0.15, 0.4)), 4),
    "vessels": (((0.3, 0.3, 0.6), (0.15, 0.15, 1.0), (0.075, 0.075, 0.7), (0.04, 0.04, 0.4)), 2),
    "streaks": (((0.3, 0.06, 1.0), (0.15, 0.0375, 0.5)), 2),  # elongated along the glottal axis, like wet folds
    "dots": (((0.05, 0.05, 1.0), (0.0375, 0.0375, 0.5)), 2),
}
# Patterns are cut from a fixed bank of large noise canvases (built once, from a fixed seed) at a random offset and
# flip per appearance: drawing fresh canvases per frame would cost more than all the rest of the renderer.
_BANK_SIZE = 512
_BANK_EXTENT = 9.6  # anatomy units covered by a bank canvas
_BANK_SEED = 20190701
_VIEW_REACH = 2.4  # anatomy units from the origin that a frame can show
_STYLE_STREAM = {"sim": 0, "real-like": 1}


def render(labels: np.ndarray, scene: Scene | None, style: str, rng: np.random.Generator) -> np.ndarray:
    """Shade the label map `labels` (H, W) uint8 in `style`, returning (H, W, 3) uint8.

    With a scene, shading follows its surfaces and the look (palette, light, patterns) comes from
    scene.appearance_seed, so a sequence keeps one look; `rng` only draws per-frame sensor noise. Without a scene
    (e.g. a real label map) shading is flat per class and the look comes from `rng`.
    """
    check_style(style)
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8 or labels.shape[0] != labels.shape[1]:
        raise ValueError(f"labels must be a square (H, W) uint8 array, got shape {labels.shape} {labels.dtype}")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"labels hold class {int(labels.max())}; expected indices below {NUM_CLASSES}")
    layers = None
    look = rng
    if scene is not None:
        if labels.shape != (scene.size, scene.size):
            raise ValueError(f"labels of shape {labels.shape} do not match the scene's size {scene.size}")
        layers = scene_layers(scene)
        look = np.random.default_rng([scene.appearance_seed, _STYLE_STREAM[style]])
    if style == "sim":
        planes = _render_sim(labels, layers, look)
    else:
        planes = _render_real_like(labels, scene, layers, look, rng)
    return np.stack([np.clip(plane * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8) for plane in planes], axis=-1)


def check_style(style: str) -> None:
    """ValueError naming the allowed styles, so callers can fail before doing any work."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(map(repr, STYLES))}")


def _render_sim(labels: np.ndarray, layers: SceneLayers | None, look: np.random.Generator) -> np.ndarray:
    """Flat materials with a little per-scene jitter, rounded folds, a darker deep glottis, a soft headlight."""
    palette = np.clip(SIM_PALETTE + look.normal(0.0, 0.02, SIM_PALETTE.shape), 0.0, 1.0).astype(np.float32)
    palette[VOID] = 0.0
    x, y = image_coordinates(labels.shape[0])
    shade = 1.0 - 0.06 * (x * x + y * y)
    if layers is not None:
        shade *= _per_class(
            labels,
            {
                VOCAL_FOLDS: 0.88 + 0.12 * _fold_profile(layers),
                GLOTTAL_SPACE: 1.0 - 0.45 * layers.glottis_depth,
                INTUBATION: 0.8 + 0.2 * _cylinder(layers.tube_across),
                SURGICAL_TOOL: 0.8 + 0.2 * _cylinder(layers.tool_across),
            },
        )
    image = np.empty((3, *labels.shape), np.float32)
    for channel in range(3):
        image[channel] = np.take(palette[:, channel], labels) * shade
    return image


def _render_real_like(
    labels: np.ndarray,
    scene: Scene | None,
    layers: SceneLayers | None,
    look: np.random.Generator,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    """Textured, lit, glossy, blurred and noisy; `look` draws the appearance, `noise_rng` the sensor noise."""
    size = labels.shape[0]
    palette = np.clip(REAL_PALETTE * np.exp(look.normal(0.0, 0.04, REAL_PALETTE.shape)), 0.0, 1.0)
    pattern = _surface_patterns(scene, size, look)
    effect = {name: np.take(row, labels) for name, row in zip(_EFFECT_NAMES, _SURFACE_EFFECTS, strict=True)}

    # Mucosa: uneven brightness, redder patches, vessels where a smooth random field crosses zero.
    shade = 1.0 + effect["mottle"] * pattern["mottle"]
    vessels = effect["vessels"] * _bump(pattern["vessels"] / 0.06)
    redness = effect["redness"] * np.clip(0.5 + 0.5 * pattern["redness"], 0.0, 1.0)
    absorption = np.minimum(redness + 0.5 * vessels, 0.9)
    if layers is not None:
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=NUM_CLASSES))
        shade *= _per_class(labels, _real_like_surfaces(layers, {int(label) for label in present}))
    # Grain: coarse on the laryngoscope's rim, faint on polished instruments.
    grain_strength = np.float32(0.1) if layers is None else np.where(layers.rim, np.float32(0.15), np.float32(0.05))
    shade *= np.where(labels == SURGICAL_TOOL, 1.0 + grain_strength * pattern["grain"], np.float32(1.0))

    # Light travels with the scope: smooth falloff from an off-centre spot, vignetting, exposure, colour cast.
    x, y = image_coordinates(size)
    light_x, light_y = (float(c) for c in look.normal(0.0, 0.25, 2))
    spread = look.uniform(0.7, 1.3)
    floor = look.uniform(0.3, 0.5)
    lighting = floor + (1.0 - floor) * np.exp(-((x - light_x) ** 2 + (y - light_y) ** 2) / (2.0 * spread**2))
    lighting *= look.uniform(0.95, 1.3)  # exposure
    vignetting = 1.0 - look.uniform(0.15, 0.45) * (0.5 * (x * x + y * y)) ** 2
    colour_cast = np.exp(look.normal(0.0, (0.04, 0.05, 0.06)))
    palette = (palette * colour_cast).astype(np.float32)
    brightness = shade * lighting * vignetting

    # Specular highlights: streaks along the wet folds, dots on the rest of the mucosa, glints on metal.
    streaks = effect["streaks"] * np.clip((pattern["streaks"] - look.uniform(1.3, 1.8)) / 0.3, 0.0, 1.0)
    dots = effect["dots"] * np.clip((pattern["dots"] - look.uniform(2.3, 2.7)) / 0.5, 0.0, 1.0)
    gloss = np.maximum(streaks, dots) * np.minimum(lighting, 1.0)

    image = np.empty((3, size, size), np.float32)
    for channel in range(3):
        plane = np.take(palette[:, channel], labels) * brightness * (1.0 - absorption * _BLOOD_ABSORPTION[channel])
        image[channel] = plane + gloss * (0.98 - plane)
    image = ndimage.gaussian_filter(image, look.uniform(0.5, 1.0), axes=(1, 2), truncate=1.5)
    image += look.uniform(0.006, 0.018) * _random_crop(_sensor_noise_bank(size), size, noise_rng)
    return image


def _real_like_surfaces(layers: SceneLayers, present: set[int]) -> dict[int, np.ndarray]:
    """Per-class shading from the scene's surface coordinates, for the classes present in the frame."""
    shading = {}
    if VOCAL_FOLDS in present:
        shading[VOCAL_FOLDS] = 0.8 + 0.2 * _fold_profile(layers)
    if OTHER_TISSUE in present:
        # The ventricle lateral to each fold shows as a dark groove.
        lateral = np.where(layers.fold_lateral > 1.0, layers.fold_lateral, np.float32(10.0))
        shading[OTHER_TISSUE] = 1.0 - 0.5 * _bump((lateral - 1.15) / 0.15)
    if GLOTTAL_SPACE in present:
        shading[GLOTTAL_SPACE] = 1.0 - 0.6 * np.sqrt(layers.glottis_depth)
    if PATHOLOGY in present:
        shading[PATHOLOGY] = 1.0 + 0.12 * (1.0 - layers.pathology_radial**2)
    if SURGICAL_TOOL in present:
        beyond_rim = np.maximum(layers.rim_distance, 0.0)
        rim = (0.7 + 0.3 * np.exp(-4.0 * beyond_rim)) * (1.0 + 0.4 * _bump(beyond_rim / 0.02))
        highlight = _bump((layers.tool_across - 0.35) / 0.15)
        metal = 0.55 + 0.35 * _cylinder(layers.tool_across) + 0.4 * highlight
        shading[SURGICAL_TOOL] = np.where(layers.rim, rim, metal)
    if INTUBATION in present:
        rings = 0.8 + 0.2 * np.cos(np.float32(math.pi) * layers.tube_rings) ** 2
        shading[INTUBATION] = (0.5 + 0.5 * _cylinder(layers.tube_across)) * rings
    return shading


def _per_class(labels: np.ndarray, by_class: dict[int, np.ndarray]) -> np.ndarray:
    """Pick, per pixel, the field given for its class (1 for classes not given)."""
    picked = np.ones(labels.shape, np.float32)
    for label, field in by_class.items():
        np.copyto(picked, field, where=labels == label, casting="same_kind")
    return picked


def _fold_profile(layers: SceneLayers) -> np.ndarray:
    """Brightness across a fold: a rounded ridge, 0 at its edges and 1 on its crest."""
    return np.sin(np.float32(math.pi) * np.clip(layers.fold_lateral, 0.0, 1.0))


def _bump(z: np.ndarray) -> np.ndarray:
    """exp(-z²), clamped before it underflows: denormal results make np.exp several times slower."""
    return np.exp(-np.minimum(z * z, 40.0))


def _cylinder(across: np.ndarray) -> np.ndarray:
    """Lambert shading across a cylinder seen side-on: 1 on its axis, 0 at its silhouette."""
    return np.sqrt(np.clip(1.0 - across * across, 0.0, 1.0))


def _surface_patterns(scene: Scene | None, size: int, look: np.random.Generator) -> dict[str, np.ndarray]:
    """Zero-mean, roughly unit-variance random fields at frame resolution.

    The mucosal patterns are anchored to the anatomy (sampled through the camera) so that they stay on the tissue as
    the camera moves; grain (metal) is anchored to the image, like the tools and the scope that carry it. Smooth
    patterns are sampled on a coarser grid and upsampled, which is much cheaper and loses nothing.
    """
    bank = _pattern_bank()
    patterns = {}
    for divisor in sorted({divisor for _, divisor in _PATTERNS.values()}):
        grid = max(size // divisor, 8)
        u, v = scene.anatomy_coordinates(grid) if scene is not None else image_coordinates(grid)
        # One random placement per grid; flips only, so that elongated patterns stay along the glottal axis.
        flip_v, flip_u = (float(f) for f in look.choice((-1.0, 1.0), 2))
        offset_v, offset_u = (float(o) for o in look.uniform(_VIEW_REACH, _BANK_EXTENT - _VIEW_REACH, 2))
        density = _BANK_SIZE / _BANK_EXTENT
        sampler = _BilinearSampler((offset_v + flip_v * v) * density, (offset_u + flip_u * u) * density)
        for name, (_, pattern_divisor) in _PATTERNS.items():
            if pattern_divisor == divisor:
                patterns[name] = _upsample(sampler(bank[name]), size)
    patterns["grain"] = _random_crop(_grain_bank(size), size, look)
    return patterns


class _BilinearSampler:
    """Bilinear lookups of several same-shaped canvases at one set of (row, col) positions.

    Index and weight computation is shared across canvases, and flat `np.take` is several times faster than
    ndimage.map_coordinates on these sizes. Positions are clamped to the canvas.
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray) -> None:
        rows = np.clip(rows, 0.0, _BANK_SIZE - 1.001).astype(np.float32)
        cols = np.clip(cols, 0.0, _BANK_SIZE - 1.001).astype(np.float32)
        row0, col0 = np.floor(rows), np.floor(cols)
        self.row_frac, self.col_frac = rows - row0, cols - col0
        self.index = row0.astype(np.intp) * _BANK_SIZE + col0.astype(np.intp)

    def __call__(self, canvas: np.ndarray) -> np.ndarray:
        flat = canvas.ravel()
        top_left, top_right = np.take(flat, self.index), np.take(flat, self.index + 1)
        bottom_left = np.take(flat, self.index + _BANK_SIZE)
        bottom_right = np.take(flat, self.index + _BANK_SIZE + 1)
        top = top_left + (top_right - top_left) * self.col_frac
        bottom = bottom_left + (bottom_right - bottom_left) * self.col_frac
        return top + (bottom - top) * self.row_frac


def _random_crop(bank: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size×size window of `bank` at a random place: fresh-looking noise without drawing any."""
    row, col = rng.integers(0, bank.shape[0] - size + 1, 2)
    return bank[row : row + size, col : col + size]


@lru_cache(maxsize=4)
def _grain_bank(size: int) -> np.ndarray:
    """Fine grain of metal surfaces: smoothed white noise, twice the frame's side, fixed seed."""
    noise = np.random.default_rng(_BANK_SEED + 1).standard_normal((size, size), dtype=np.float32)
    grain = _upsample(noise, 2 * size)
    grain /= grain.std()
    grain.setflags(write=False)
    return grain


@lru_cache(maxsize=4)
def _sensor_noise_bank(size: int) -> np.ndarray:
    """Unit Gaussian pixel noise, twice the frame's side, fixed seed: frames take random crops of it."""
    noise = np.random.default_rng(_BANK_SEED + 2).standard_normal((2 * size, 2 * size), dtype=np.float32)
    noise.setflags(write=False)
    return noise


@lru_cache(maxsize=1)
def _pattern_bank() -> dict[str, np.ndarray]:
    """One large normalised noise canvas per pattern; deterministic, so every process renders alike."""
    rng = np.random.default_rng(_BANK_SEED)
    bank = {}
    for name, (octaves, _) in _PATTERNS.items():
        canvas = np.zeros((_BANK_SIZE, _BANK_SIZE), np.float32)
        for size_v, size_u, gain in octaves:
            cells_v, cells_u = round(_BANK_EXTENT / size_v), round(_BANK_EXTENT / size_u)
            lattice = rng.standard_normal((cells_v, cells_u), dtype=np.float32)
            canvas += gain * (_smooth_interpolation(cells_v) @ lattice @ _smooth_interpolation(cells_u).T)
        canvas /= max(float(canvas.std()), 1e-6)
        canvas.setflags(write=False)
        bank[name] = canvas
    return bank


@lru_cache(maxsize=32)
def _smooth_interpolation(cells: int) -> np.ndarray:
    """(bank, cells) Gaussian-kernel weights that spread a lattice smoothly over a bank canvas."""
    canvas_positions = (np.arange(_BANK_SIZE) + 0.5) / _BANK_SIZE
    lattice_positions = (np.arange(cells) + 0.5) / cells
    weights = np.exp(-(((canvas_positions[:, None] - lattice_positions[None, :]) * cells / 0.7) ** 2))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=16)
def _linear_interpolation(source: int, target: int) -> np.ndarray:
    """(target, source) bilinear resampling weights between two pixel-centre grids covering the same extent."""
    positions = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0.0, source - 1.0)
    low = np.minimum(np.floor(positions).astype(int), max(source - 2, 0))
    frac = positions - low
    weights = np.zeros((target, source), np.float32)
    weights[np.arange(target), low] += 1.0 - frac
    if source > 1:
        weights[np.arange(target), low + 1] += frac
    return weights


def _upsample(field: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a square field to size×size, as two small matrix products."""
    weights = _linear_interpolation(field.shape[0], size)
    return weights @ field @ weights.T
