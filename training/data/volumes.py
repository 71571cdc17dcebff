"""CT-like volumes: a simulator of abdominal scans and NIfTI reading/writing in a FLARE22-like layout.

Why: propagation through a volume (slice to slice, both directions) needs CT data for tests and the demo; real
FLARE22 scans are large and licensed, so the simulator draws a few organs as smooth 3-D blobs with plausible
Hounsfield units, noise and anisotropic spacing.

Layout (as FLARE22 ships): <root>/imagesTr/<case>_0000.nii.gz (HU) and <root>/labelsTr/<case>.nii.gz (organ
labels, FLARE22 numbering: 1 liver, 2 right kidney, 3 spleen, 5 aorta, 13 left kidney, ...). Arrays are (X, Y, Z)
as nibabel returns them, Z the slice axis; spacing is in mm per axis. Problems raise DataError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from training.data.classes import FLARE22_CLASS_NAMES
from training.data.folders import DataError

ORGANS: dict[int, str] = {label: FLARE22_CLASS_NAMES[label] for label in (1, 2, 3, 5, 13)}  # the simulated ones
# label: (centre as a fraction of the body box (x, y, z), radii as fractions, HU)
_ORGAN_SHAPES: dict[int, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    1: ((0.30, 0.40, 0.55), (0.22, 0.22, 0.30), 60.0),
    3: ((0.72, 0.35, 0.60), (0.10, 0.12, 0.18), 50.0),
    2: ((0.33, 0.70, 0.40), (0.07, 0.08, 0.16), 160.0),
    13: ((0.67, 0.70, 0.42), (0.07, 0.08, 0.16), 160.0),
    5: ((0.50, 0.62, 0.50), (0.035, 0.035, 0.60), 200.0),
}


@dataclass
class Volume:
    """hu: (X, Y, Z) float32 Hounsfield units; labels: (X, Y, Z) uint8 or None; spacing: mm per axis."""

    hu: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, float, float]
    name: str = "volume"


def simulate_volume(
    seed: int, shape: tuple[int, int, int] = (96, 96, 40), spacing: tuple[float, float, float] = (2.0, 2.0, 4.0)
) -> Volume:
    """One abdominal CT-like scan: air, a body of fat and muscle, five organs whose surfaces wobble smoothly."""
    rng = np.random.default_rng([seed, 7])
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
    hu = np.full(shape, -1000.0, np.float32)
    body_radius = rng.uniform(0.40, 0.47, 2)
    body = ((grid[0] - 0.5) / body_radius[0]) ** 2 + ((grid[1] - 0.5) / body_radius[1]) ** 2
    hu[body < 1.0] = -100.0  # subcutaneous fat
    hu[body < 0.8] = 40.0  # muscle and soft tissue
    labels = np.zeros(shape, np.uint8)
    for label, (centre, radii, organ_hu) in _ORGAN_SHAPES.items():
        centre = np.asarray(centre) + rng.normal(0, 0.02, 3)
        radii = np.asarray(radii) * rng.uniform(0.85, 1.15, 3)
        distance = sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3))
        wobble = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), sigma=max(shape) / 10)
        wobble /= np.abs(wobble).max() + 1e-6
        organ = (distance + 0.35 * wobble < 1.0) & (labels == 0)
        labels[organ] = label
        hu[organ] = organ_hu + rng.normal(0, 8)
    hu = ndimage.gaussian_filter(hu, 0.7) + rng.normal(0, 12, shape).astype(np.float32)
    hu = np.round(hu).astype(np.float32)  # CT stores whole Hounsfield units
    return Volume(hu=hu, labels=labels, spacing=tuple(float(s) for s in spacing), name=f"sim_{seed}")


def window(hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """HU → uint8 grey levels through a CT window (default: abdominal soft tissue)."""
    low = level - width / 2
    return (np.clip((hu - low) / width, 0, 1) * 255).round().astype(np.uint8)


def slices_as_frames(hu: np.ndarray, axis: int = 2) -> np.ndarray:
    """(X, Y, Z) HU → (Z, X, Y, 3) uint8 frames along `axis`, windowed and grey in all three channels."""
    grey = np.moveaxis(window(hu), axis, 0)
    return np.repeat(grey[..., None], 3, axis=-1)


def write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, float, float]) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine=np.diag([*spacing, 1.0]))
    image.header.set_zooms(spacing)
    nib.save(image, str(path))
    return path


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(array (X, Y, Z), spacing) of a NIfTI file; DataError naming the file when missing, unreadable or not 3-D."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a NIfTI volume (.nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj)
    except Exception as error:  # nibabel raises several types for truncated or foreign files
        raise DataError(f"{path}: cannot read ({error}); expected a NIfTI volume (.nii or .nii.gz)") from error
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: array has shape {array.shape}; expected a 3-D volume (X, Y, Z)")
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    return array, spacing


def write_case(root: Path, volume: Volume) -> tuple[Path, Path | None]:
    """Write one case in the FLARE22-like layout; returns (image path, label path or None)."""
    image = write_nifti(root / "imagesTr" / f"{volume.name}_0000.nii.gz", volume.hu.astype(np.int16), volume.spacing)
    label = None
    if volume.labels is not None:
        label = write_nifti(root / "labelsTr" / f"{volume.name}.nii.gz", volume.labels, volume.spacing)
    return image, label


def case_index(root: Path) -> list[tuple[str, Path, Path | None]]:
    """(case name, image path, label path or None) of every imagesTr/*.nii.gz under `root`."""
    root = Path(root)
    images = sorted((root / "imagesTr").glob("*.nii*"))
    if not images:
        raise DataError(f"{root}: no volumes; expected imagesTr/<case>_0000.nii.gz (FLARE22 layout)")
    cases = []
    for image in images:
        case = image.name.split(".nii")[0].removesuffix("_0000")
        cases.append((case, image, label_file(root, case)))
    return cases


def label_file(root: Path, case: str) -> Path | None:
    """<root>/labelsTr/<case>.nii.gz (or .nii) when it exists."""
    return next(iter(sorted((Path(root) / "labelsTr").glob(f"{case}.nii*"))), None)


def read_case(image_path: Path, label_path: Path | None = None) -> Volume:
    """A case from disk; labels must match the image's shape."""
    hu, spacing = read_nifti(image_path)
    labels = None
    if label_path is not None:
        labels, _ = read_nifti(label_path)
        if labels.shape != hu.shape:
            raise DataError(f"{label_path}: labels have shape {labels.shape} but {image_path} has {hu.shape}")
        if np.any(labels < 0) or np.any(labels > 255) or np.any(np.mod(labels, 1) != 0):
            raise DataError(f"{label_path}: expected integer organ labels in 0..255")
        labels = labels.astype(np.uint8)
    name = Path(image_path).name.split(".nii")[0].removesuffix("_0000")
    return Volume(hu=hu.astype(np.float32), labels=labels, spacing=spacing, name=name)
