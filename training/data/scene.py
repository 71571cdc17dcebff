"""Procedural laryngoscopy scenes: random anatomy and camera, rasterised to label maps.

Why: the segmenter needs unlimited labelled frames of the source domain. Every structure is a handful of parameters,
so scenes are cheap to draw, exact to label and easy to animate into smooth sequences.

What a scene looks like follows the vocalfolds dataset (M.-H. Laves, J. Bicker, L. A. Kahrs, T. Ortmaier, "A Dataset
of Laryngeal Endoscopic Images with Comparative Study on Convolution Neural Network Based Semantic Segmentation",
IJCARS 2019, CC BY 4.0): two vocal folds forming a V around the dark glottal opening, other tissue around them,
sometimes a pathology on a fold, surgical tools or an intubation tube, and the laryngoscope's rim (labelled
surgical_tool) closing the view. This module holds geometry only; `render.py` turns it into colours and
`simulator.py` composes the two into frames and sequences.

Coordinates (all float32 arrays are (H, W), row = y):
- image: x right, y down, both in [-1, 1] over pixel centres. Tools and the laryngoscope's field of view live here,
  since they move with the instruments, not with the anatomy.
- anatomy: u lateral, v along the glottal axis, from the anterior commissure (v < 0, top of an upright view) to the
  posterior end (v > 0). One unit is half the frame width at zoom 1.
- camera: anatomy = look_at + R(rotation) @ (x, y * aspect) / zoom.

Determinism: every random number comes from numpy Generators seeded with (seed, stream, index), so a frame is the
same bytes whenever it is generated on one machine. Across CPU types, vectorised float maths may differ in the last
bit, which can flip a rare boundary pixel; never compare frames generated on different hardware byte for byte.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from training.data.classes import (
    GLOTTAL_SPACE,
    INTUBATION,
    OTHER_TISSUE,
    PATHOLOGY,
    SURGICAL_TOOL,
    VOCAL_FOLDS,
    VOID,
)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn.

    size: side of the square label map in pixels.
    pathology_prob / tool_prob / intubation_prob: chance that a scene shows a pathology on a fold, at least one
        surgical instrument, an intubation tube through the glottis.
    second_tool_prob: chance of a second instrument, given a first one.
    scope_rim_prob: chance that the laryngoscope's rim is inside the view (otherwise it lies far outside).
    image_circle_prob: chance that the optics' round image leaves black (void) corners.
    zoom_range: camera zoom, drawn log-uniformly; real frames are mostly close-ups, hence the upper end.
    max_rotation: largest camera roll in radians.
    """

    size: int = 256
    pathology_prob: float = 0.3
    tool_prob: float = 0.5
    second_tool_prob: float = 0.3
    intubation_prob: float = 0.3
    scope_rim_prob: float = 0.5
    image_circle_prob: float = 0.2
    zoom_range: tuple[float, float] = (1.0, 3.2)
    max_rotation: float = 0.6

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        probabilities = ("pathology_prob", "tool_prob", "second_tool_prob", "intubation_prob")
        for name in (*probabilities, "scope_rim_prob", "image_circle_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        low, high = self.zoom_range
        if not 0.0 < low <= high:
            raise ValueError(f"zoom_range must be 0 < low <= high, got {self.zoom_range}")


@dataclass(frozen=True)
class Camera:
    """Where the endoscope looks: zoom (>1 = closer), roll in radians, aspect (foreshortening of v), look-at point."""

    zoom: float
    rotation: float
    aspect: float
    look_u: float
    look_v: float


@dataclass(frozen=True)
class Larynx:
    """The glottis and the two vocal folds around it, in anatomy units.

    The glottal half-width at distance t from the anterior commissure is tan(opening) * t * (1 + convexity *
    (1 - t / length)); a half-ellipse of depth posterior_cap * half-width closes it behind. Each fold is a band of
    its own width along the glottal edge, running fold_tail * length past the glottis; fold_wobble (relative
    amplitude, with its phase) makes that width uneven, as real folds are. bend curves the midline.
    """

    length: float
    opening: float
    convexity: float
    bend: float
    posterior_cap: float
    fold_width_left: float
    fold_width_right: float
    fold_tail: float
    fold_wobble: float
    fold_wobble_phase: float


@dataclass(frozen=True)
class Pathology:
    """A lobulated lesion on one fold: side (+1 = u > 0), position along the fold (fraction of its length) and
    across it (fraction of its width), radius in anatomy units, lobes as (du, dv, radius) relative to that radius."""

    side: int
    along: float
    across: float
    radius: float
    lobes: tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class Tube:
    """An intubation tube seen through the glottis: centre along the axis (fraction of the glottal length from the
    commissure), radius relative to the posterior glottal half-width, distance between its rings in anatomy units."""

    along: float
    radius: float
    ring_period: float


@dataclass(frozen=True)
class Tool:
    """A surgical instrument entering the view: tip in image coordinates, direction (radians) from the tip back
    along the shaft, shaft width at the tip, and a two-jaw head of given length and opening angle."""

    tip_x: float
    tip_y: float
    direction: float
    width: float
    jaw_length: float
    jaw_opening: float


@dataclass(frozen=True)
class Scope:
    """The laryngoscope's circular field of view in image coordinates; outside it the rim is labelled
    surgical_tool, as in the real data. A radius far beyond the frame means the rim is not visible."""

    centre_x: float
    centre_y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to rasterise one frame. Frozen and hashable, so per-pixel layers can be cached.

    appearance_seed: identity of the tissue's surface pattern and lighting (not colours): the renderer derives
    them from it, so every frame of a sequence shows the same patient under the same light.
    image_circle_radius: radius of the optics' round image (outside = void), None when it covers the frame.
    """

    size: int
    camera: Camera
    larynx: Larynx
    pathology: Pathology | None
    tube: Tube | None
    tools: tuple[Tool, ...]
    scope: Scope
    image_circle_radius: float | None
    appearance_seed: int

    def anatomy_coordinates(self, grid: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) at the pixel centres of a grid×grid raster covering the frame (default: the frame's own size)."""
        x, y = image_coordinates(grid or self.size)
        cam = self.camera
        cos_r, sin_r = math.cos(cam.rotation), math.sin(cam.rotation)
        xs = x / cam.zoom
        ys = y * (cam.aspect / cam.zoom)
        u = cam.look_u + cos_r * xs - sin_r * ys
        v = cam.look_v + sin_r * xs + cos_r * ys
        return u, v


@dataclass(frozen=True)
class SceneLayers:
    """Per-pixel masks and surface coordinates of one scene.

    `label_map` composes the masks; the renderer shades with the coordinates, which are defined at every pixel
    (meaningful only inside their structure) so that it can be driven by any label map.
    """

    glottis: np.ndarray
    folds: np.ndarray
    pathology: np.ndarray
    tube: np.ndarray
    tools: np.ndarray
    rim: np.ndarray
    void: np.ndarray
    glottis_depth: np.ndarray  # 0 at the glottal edge, 1 deep on the midline
    fold_lateral: np.ndarray  # 0 at the glottal edge, 1 at the fold's (tapered) outer edge, growing beyond
    pathology_radial: np.ndarray  # 0 at a lobe's centre, 1 at its edge
    tube_across: np.ndarray  # -1..1 across the tube
    tube_rings: np.ndarray  # position along the tube in ring periods
    tool_across: np.ndarray  # -1..1 across a shaft, 0 on the jaws
    rim_distance: np.ndarray  # image units beyond the scope's circle (negative inside)


@lru_cache(maxsize=8)
def image_coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) in [-1, 1], read-only and cached because every frame needs them."""
    centres = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    x = np.ascontiguousarray(np.broadcast_to(centres[None, :], (size, size)))
    y = np.ascontiguousarray(np.broadcast_to(centres[:, None], (size, size)))
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _glottal_half_width(larynx: Larynx, t: np.ndarray) -> np.ndarray:
    """Half-width of the glottis at distance t from the commissure (t clamped to the glottis)."""
    tc = np.clip(t, 0.0, larynx.length)
    return (math.tan(larynx.opening) * tc) * (1.0 + larynx.convexity * (1.0 - tc / larynx.length))


def _midline_offset(larynx: Larynx, t: np.ndarray | float) -> np.ndarray | float:
    """Lateral shift of the curved midline at distance t from the commissure."""
    return larynx.bend * larynx.length * np.clip(np.asarray(t) / larynx.length, 0.0, 1.3) ** 2


def _larynx_layers(larynx: Larynx, u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    t = v + 0.5 * larynx.length
    lateral = u - _midline_offset(larynx, t)
    abs_lateral = np.abs(lateral)
    half_width = _glottal_half_width(larynx, t)
    posterior_half_width = max(math.tan(larynx.opening) * larynx.length, 1e-4)

    body_depth = 1.0 - abs_lateral / np.maximum(half_width, 1e-4)
    behind = t - larynx.length
    cap_depth = 1.0 - np.sqrt(
        (abs_lateral / posterior_half_width) ** 2 + (behind / (larynx.posterior_cap * posterior_half_width)) ** 2
    )
    depth = np.where(behind > 0, cap_depth, body_depth)
    glottis = (depth > 0) & (t >= 0)

    # Fold bands follow the glottal edge; sqrt tapers round them off at the commissure and the posterior end.
    on_left = lateral >= 0
    width = np.where(on_left, np.float32(larynx.fold_width_left), np.float32(larynx.fold_width_right))
    apex_round = 0.5 * width
    end = larynx.length * (1.0 + larynx.fold_tail)
    taper = np.sqrt(np.clip((t + apex_round) / (2.0 * apex_round), 0.0, 1.0)) * np.sqrt(
        np.clip((end - t) / apex_round, 0.0, 1.0)
    )
    from_edge = abs_lateral - half_width
    side_phase = np.where(on_left, np.float32(larynx.fold_wobble_phase), np.float32(larynx.fold_wobble_phase + 2.0))
    wobble = 1.0 + larynx.fold_wobble * np.sin((2.0 * math.pi / larynx.length) * t + side_phase)
    local_width = width * taper * wobble
    folds = ~glottis & (from_edge >= 0) & (from_edge < local_width)
    return {
        "glottis": glottis,
        "folds": folds,
        "glottis_depth": np.clip(depth, 0.0, 1.0).astype(np.float32),
        "fold_lateral": np.clip(from_edge / np.maximum(local_width, 1e-3), -10.0, 10.0).astype(np.float32),
    }


def _pathology_layers(scene: Scene, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lesion, larynx = scene.pathology, scene.larynx
    if lesion is None:
        return np.zeros(u.shape, bool), np.ones(u.shape, np.float32)
    t_centre = lesion.along * larynx.length
    width = larynx.fold_width_left if lesion.side > 0 else larynx.fold_width_right
    edge = float(_glottal_half_width(larynx, np.float32(t_centre)))
    centre_u = float(_midline_offset(larynx, t_centre)) + lesion.side * (edge + lesion.across * width)
    centre_v = t_centre - 0.5 * larynx.length
    radial_squared = np.full(u.shape, np.inf, np.float32)
    for du, dv, lobe_radius in lesion.lobes:
        inverse_radius = 1.0 / (lobe_radius * lesion.radius)
        across = (u - (centre_u + du * lesion.radius)) * inverse_radius
        along = (v - (centre_v + dv * lesion.radius)) * inverse_radius
        radial_squared = np.minimum(radial_squared, across * across + along * along)
    radial = np.sqrt(np.minimum(radial_squared, 4.0))
    return radial < 1.0, radial


def _tube_layers(scene: Scene, u: np.ndarray, v: np.ndarray, glottis: np.ndarray) -> dict[str, np.ndarray]:
    tube, larynx = scene.tube, scene.larynx
    if tube is None:
        zeros = np.zeros(u.shape, np.float32)
        return {"tube": np.zeros(u.shape, bool), "tube_across": zeros, "tube_rings": zeros}
    t_centre = tube.along * larynx.length
    radius = tube.radius * max(math.tan(larynx.opening) * larynx.length, 1e-3)
    across = (u - float(_midline_offset(larynx, t_centre))) / radius
    along = (v - (t_centre - 0.5 * larynx.length)) / radius
    inside = across**2 + along**2 < 1.0
    return {
        "tube": inside & glottis,
        "tube_across": np.clip(across, -1.0, 1.0).astype(np.float32),
        # Rings bow towards the viewer, as a tube seen obliquely shows them.
        "tube_rings": ((along + 0.35 * across**2) * (radius / tube.ring_period)).astype(np.float32),
    }


def _tool_layers(tools: tuple[Tool, ...], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(x.shape, bool)
    across_all = np.zeros(x.shape, np.float32)
    for tool in tools:
        dx, dy = math.cos(tool.direction), math.sin(tool.direction)
        px, py = x - tool.tip_x, y - tool.tip_y
        along = px * dx + py * dy
        across = px * dy - py * dx
        # The shaft widens away from the tip: it comes towards the camera.
        half_width = 0.5 * tool.width * (1.0 + 0.35 * np.maximum(along, 0.0))
        shaft = (along >= 0) & (np.abs(across) < half_width)
        head = np.zeros(x.shape, bool)
        for sign in (-1.0, 1.0):
            angle = tool.direction + math.pi + sign * 0.5 * tool.jaw_opening
            jx, jy = math.cos(angle), math.sin(angle)
            s = np.clip(px * jx + py * jy, 0.0, tool.jaw_length)
            head |= (px - s * jx) ** 2 + (py - s * jy) ** 2 < (0.3 * tool.width) ** 2
        across_all = np.where(shaft, across / half_width, np.where(head, 0.0, across_all))
        mask |= shaft | head
    return mask, across_all.astype(np.float32)


@lru_cache(maxsize=2)
def scene_layers(scene: Scene) -> SceneLayers:
    """Rasterise every structure of `scene` once; cached because label_map and render both need it."""
    u, v = scene.anatomy_coordinates()
    x, y = image_coordinates(scene.size)
    larynx = _larynx_layers(scene.larynx, u, v)
    pathology, pathology_radial = _pathology_layers(scene, u, v)
    tube = _tube_layers(scene, u, v, larynx["glottis"])
    tools, tool_across = _tool_layers(scene.tools, x, y)
    scope = scene.scope
    rim_distance = np.sqrt((x - scope.centre_x) ** 2 + (y - scope.centre_y) ** 2) - scope.radius
    if scene.image_circle_radius is None:
        void = np.zeros(x.shape, bool)
    else:
        void = x**2 + y**2 > scene.image_circle_radius**2
    layers = SceneLayers(
        pathology=pathology,
        pathology_radial=pathology_radial,
        tools=tools,
        tool_across=tool_across,
        rim=rim_distance > 0,
        rim_distance=rim_distance,
        void=void,
        **larynx,
        **tube,
    )
    for field in dataclasses.fields(layers):
        getattr(layers, field.name).setflags(write=False)
    return layers


def label_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8 class indices of classes.py, painted back to front: occluders overwrite what they hide."""
    layers = scene_layers(scene)
    labels = np.full((scene.size, scene.size), OTHER_TISSUE, np.uint8)
    for mask, label in (
        (layers.glottis, GLOTTAL_SPACE),
        (layers.tube, INTUBATION),
        (layers.folds, VOCAL_FOLDS),
        (layers.pathology, PATHOLOGY),
        (layers.tools, SURGICAL_TOOL),
        (layers.rim, SURGICAL_TOOL),
        (layers.void, VOID),
    ):
        labels[mask] = label
    return labels


def _draw_larynx(rng: np.random.Generator, intubated: bool) -> Larynx:
    if intubated:
        opening = rng.uniform(0.2, 0.36)  # a tube holds the glottis open
    elif rng.random() < 0.3:
        opening = rng.uniform(0.03, 0.08)  # adducted, as in phonation
    else:
        opening = rng.uniform(0.08, 0.33)
    base_width = rng.uniform(0.2, 0.42)
    return Larynx(
        length=float(rng.uniform(0.9, 1.3)),
        opening=float(opening),
        convexity=float(rng.uniform(0.0, 0.6)),
        bend=float(rng.normal(0.0, 0.06)),
        posterior_cap=float(rng.uniform(0.3, 1.0)),
        fold_width_left=float(base_width * rng.uniform(0.85, 1.15)),
        fold_width_right=float(base_width * rng.uniform(0.85, 1.15)),
        fold_tail=float(rng.uniform(0.0, 0.2)),
        fold_wobble=float(rng.uniform(0.0, 0.15)),
        fold_wobble_phase=float(rng.uniform(0.0, 2.0 * math.pi)),
    )


def _draw_pathology(rng: np.random.Generator, larynx: Larynx) -> Pathology:
    side = 1 if rng.random() < 0.5 else -1
    width = larynx.fold_width_left if side > 0 else larynx.fold_width_right
    lobes = [(0.0, 0.0, 1.0)]
    for _ in range(int(rng.integers(1, 4))):
        angle, distance = rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 0.8)
        lobes.append((distance * math.cos(angle), distance * math.sin(angle), float(rng.uniform(0.4, 0.75))))
    return Pathology(
        side=side,
        along=float(rng.uniform(0.15, 0.75)),
        across=float(rng.uniform(0.2, 0.8)),
        radius=float(width * rng.uniform(0.3, 0.7)),
        lobes=tuple(lobes),
    )


def _draw_tool(rng: np.random.Generator) -> Tool:
    width = rng.uniform(0.07, 0.16)
    return Tool(
        tip_x=float(rng.uniform(-0.5, 0.5)),
        tip_y=float(rng.uniform(-0.4, 0.5)),
        direction=float(0.5 * math.pi + rng.normal(0.0, 0.9)),  # mostly entering from below, through the scope
        width=float(width),
        jaw_length=float(width * rng.uniform(0.8, 1.6)),
        jaw_opening=float(rng.uniform(0.0, 0.8)),
    )


def _draw_scope(rng: np.random.Generator, cfg: SceneConfig) -> Scope:
    if rng.random() >= cfg.scope_rim_prob:
        return Scope(centre_x=0.0, centre_y=0.0, radius=10.0)
    # The blade sits anteriorly, so the rim mostly closes the top of the view.
    angle = 0.5 * math.pi + rng.normal(0.0, 0.6)
    offset = rng.uniform(0.2, 0.9)
    return Scope(
        centre_x=float(offset * math.cos(angle)),
        centre_y=float(offset * math.sin(angle)),
        radius=float(rng.uniform(1.2, 2.0)),
    )


def sample_scene(rng: np.random.Generator, cfg: SceneConfig | None = None) -> Scene:
    """Draw one random scene; all randomness comes from `rng`, so a seeded generator gives the same scene."""
    cfg = cfg or SceneConfig()
    intubated = rng.random() < cfg.intubation_prob
    larynx = _draw_larynx(rng, intubated)
    camera = Camera(
        zoom=float(math.exp(rng.uniform(math.log(cfg.zoom_range[0]), math.log(cfg.zoom_range[1])))),
        rotation=float(np.clip(rng.normal(0.0, 0.3), -cfg.max_rotation, cfg.max_rotation)),
        aspect=float(rng.uniform(0.8, 1.25)),
        look_u=float(rng.uniform(-0.25, 0.25)),
        look_v=float(rng.uniform(-0.5, 0.5) * larynx.length),
    )
    pathology = _draw_pathology(rng, larynx) if rng.random() < cfg.pathology_prob else None
    tube = (
        Tube(
            along=float(rng.uniform(0.7, 1.05)),
            radius=float(rng.uniform(0.7, 1.2)),
            ring_period=float(rng.uniform(0.04, 0.08)),
        )
        if intubated
        else None
    )
    tools: list[Tool] = []
    if rng.random() < cfg.tool_prob:
        tools.append(_draw_tool(rng))
        if rng.random() < cfg.second_tool_prob:
            tools.append(_draw_tool(rng))
    image_circle = float(rng.uniform(1.0, 1.35)) if rng.random() < cfg.image_circle_prob else None
    return Scene(
        size=cfg.size,
        camera=camera,
        larynx=larynx,
        pathology=pathology,
        tube=tube,
        tools=tuple(tools),
        scope=_draw_scope(rng, cfg),
        image_circle_radius=image_circle,
        appearance_seed=int(rng.integers(2**62)),
    )


def _smooth_wave(rng: np.random.Generator, length: int, amplitude: float, periods: tuple[float, float]) -> np.ndarray:
    """A zero-mean random motion: two sinusoids with periods (in frames) drawn from `periods`."""
    frames = np.arange(length, dtype=np.float64)
    wave = np.zeros(length)
    for weight in (rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.5)):
        period = rng.uniform(*periods)
        wave += weight * amplitude * np.sin(2 * math.pi * frames / period + rng.uniform(0, 2 * math.pi))
    return wave


def sample_sequence(rng: np.random.Generator, length: int, cfg: SceneConfig | None = None) -> list[Scene]:
    """A video-like run of `length` scenes of one patient: smooth camera drift, the glottis opening and closing
    (breathing), tools moving and their jaws working. Anatomy, lesion and appearance stay the same."""
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    base = sample_scene(rng, cfg)
    cam, larynx = base.camera, base.larynx
    zoom = cam.zoom * np.exp(_smooth_wave(rng, length, 0.12, (30, 90)))
    rotation = cam.rotation + _smooth_wave(rng, length, 0.1, (40, 120))
    look_u = cam.look_u + _smooth_wave(rng, length, 0.06, (30, 90))
    look_v = cam.look_v + _smooth_wave(rng, length, 0.06, (30, 90)) + _smooth_wave(rng, length, 0.02, (15, 30))
    low, high = (0.18, 0.38) if base.tube is not None else (0.03, 0.38)
    swing = 0.02 if base.tube is not None else 0.08
    opening = np.clip(larynx.opening + _smooth_wave(rng, length, swing, (14, 40)), low, high)
    tool_tracks = [
        (
            tool.tip_x + _smooth_wave(rng, length, 0.08, (20, 60)),
            tool.tip_y + _smooth_wave(rng, length, 0.08, (20, 60)),
            tool.direction + _smooth_wave(rng, length, 0.08, (30, 90)),
            np.clip(tool.jaw_opening + _smooth_wave(rng, length, 0.3, (10, 30)), 0.0, 0.9),
        )
        for tool in base.tools
    ]
    scope_x = base.scope.centre_x + _smooth_wave(rng, length, 0.03, (30, 90))
    scope_y = base.scope.centre_y + _smooth_wave(rng, length, 0.03, (30, 90))

    scenes = []
    for k in range(length):
        tools = tuple(
            dataclasses.replace(
                tool, tip_x=float(tx[k]), tip_y=float(ty[k]), direction=float(dr[k]), jaw_opening=float(jaw[k])
            )
            for tool, (tx, ty, dr, jaw) in zip(base.tools, tool_tracks, strict=True)
        )
        scenes.append(
            dataclasses.replace(
                base,
                camera=dataclasses.replace(
                    cam,
                    zoom=float(zoom[k]),
                    rotation=float(rotation[k]),
                    look_u=float(look_u[k]),
                    look_v=float(look_v[k]),
                ),
                larynx=dataclasses.replace(larynx, opening=float(opening[k])),
                tools=tools,
                scope=dataclasses.replace(base.scope, centre_x=float(scope_x[k]), centre_y=float(scope_y[k])),
            )
        )
    return scenes
