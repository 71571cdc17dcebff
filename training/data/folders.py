"""Readers and a writer for image sets with optional label masks, local or on S3 (through storage.py).

Why: real frames, their masks and translated simulator sets all arrive as folders of PNG/JPEG files. Indexing
(which files, which mask belongs to which image) is kept apart from decoding, so that an index can be split across
workers and each loads only its share. Every problem found in the data raises DataError naming the file and what
was expected, because "bad data" without a file name costs an afternoon on a cluster.

Two layouts are read:
- vocalfolds (Laves et al., "A Dataset of Laryngeal Endoscopic Images with Comparative Study on Convolution Neural
  Network Based Semantic Segmentation", IJCARS 2019, CC BY 4.0): img/<patient>/<sequence>/<frame>.png with
  annot/<patient>/<sequence>/<frame>.png holding our class indices directly.
- folder (as EISOST-style sets ship): images/<name>.png|jpg, masks/<name>.png matched by name, and classes.json
  (or classes.yaml) mapping mask values to our class names: {"0": "void", "255": "vocal_folds"} for grey masks or
  {"255,0,0": "surgical_tool"} for colour masks (or the names of another label set of classes.py, e.g. FLARE22's
  organs; one set a folder). `write_folder_dataset` writes this layout. An optional
  keep/<name>.png per frame (255 keep, 0 ignore; `endoflow propagate pseudo-label` writes them) turns the labels
  of ignored pixels into IGNORE_INDEX, which every loss and metric skips: classes.json can only name classes, so
  the ignore value cannot live in masks/ itself.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.data import storage
from training.data.classes import CLASS_NAMES, IGNORE_INDEX, LABEL_SETS, NUM_CLASSES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png",)
CLASS_MAP_FILES = ("classes.json", "classes.yaml", "classes.yml")
KEEP_DIR = "keep"
_UNMAPPED = 255  # marker in lookup tables for values missing from a class map


class DataError(ValueError):
    """The data on disk or in S3 is not what the reader expects; the message names the file and the expectation."""


@dataclass(frozen=True)
class ClassMap:
    """How the values stored in mask files become our class indices.

    values: stored value -> class index. For colour masks the stored value is the packed colour r << 16 | g << 8 | b.
    source: where the map came from, for error messages.
    """

    values: Mapping[int, int]
    colour: bool = False
    source: str = "our class indices"

    @classmethod
    def identity(cls) -> ClassMap:
        """Masks that already hold our class indices, as vocalfolds annotations and written folders do."""
        return cls(values={index: index for index in range(NUM_CLASSES)})

    @classmethod
    def from_names(cls, mapping: Mapping[Any, Any], source: str) -> ClassMap:
        """Parse {"0": "void", "255": "vocal_folds"} or {"255,0,0": "surgical_tool"}; DataError when malformed."""
        if not isinstance(mapping, Mapping) or not mapping:
            raise DataError(f"{source}: expected a non-empty mapping of mask values to class names")
        values: dict[int, int] = {}
        kinds = set()
        for key, name in mapping.items():
            if not any(name in names for names in LABEL_SETS.values()):
                valid = "; ".join(f"{', '.join(names)} ({label_set})" for label_set, names in LABEL_SETS.items())
                raise DataError(f"{source}: unknown class name {name!r} for mask value {key!r}; valid names: {valid}")
        names = next((names for names in LABEL_SETS.values() if all(n in names for n in mapping.values())), None)
        if names is None:
            raise DataError(f"{source}: mixes the class names of several label sets ({', '.join(LABEL_SETS)})")
        for key, name in mapping.items():
            parts = [part.strip() for part in str(key).split(",")]
            if len(parts) not in (1, 3) or not all(part.isdigit() for part in parts):
                raise DataError(f"{source}: bad mask value {key!r}; expected a grey level like '255' or 'r,g,b'")
            levels = [int(part) for part in parts]
            if len(levels) == 3 and max(levels) > 255:
                raise DataError(f"{source}: colour {key!r} has a channel above 255")
            kinds.add(len(levels))
            packed = levels[0] if len(levels) == 1 else (levels[0] << 16) | (levels[1] << 8) | levels[2]
            values[packed] = names.index(name)
        if len(kinds) > 1:
            raise DataError(f"{source}: mixes grey levels and 'r,g,b' colours; expected one kind of mask value")
        return cls(values=values, colour=kinds == {3}, source=source)

    def describe_values(self) -> str:
        keys = sorted(self.values)
        if self.colour:
            return ", ".join(f"({key >> 16},{(key >> 8) & 255},{key & 255})" for key in keys)
        return ", ".join(str(key) for key in keys)


@dataclass(frozen=True)
class FrameIndex:
    """Which frames a dataset holds: image URIs, mask URIs (None when unlabelled), the sequence of each frame, and
    how mask values map to classes; keep: keep-mask URIs (labels where they are 0 become IGNORE_INDEX), or None.
    Cheap to build and to split; nothing is decoded until load_frames."""

    images: tuple[str, ...]
    masks: tuple[str, ...] | None
    sequences: tuple[str, ...]
    class_map: ClassMap = field(default_factory=ClassMap.identity)
    keep: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        lengths = {len(self.images), len(self.sequences)} | {len(p) for p in (self.masks, self.keep) if p is not None}
        if len(lengths) > 1:
            raise ValueError("images, masks, keep and sequences of a FrameIndex must have one entry per frame")
        if self.keep is not None and self.masks is None:
            raise ValueError("a FrameIndex with keep masks needs label masks")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, positions: Iterable[int]) -> FrameIndex:
        """The frames at `positions`, e.g. one worker's shard: index[i::world_size]."""
        chosen = list(positions)
        return FrameIndex(
            images=tuple(self.images[i] for i in chosen),
            masks=None if self.masks is None else tuple(self.masks[i] for i in chosen),
            sequences=tuple(self.sequences[i] for i in chosen),
            class_map=self.class_map,
            keep=None if self.keep is None else tuple(self.keep[i] for i in chosen),
        )


def vocalfolds_index(
    root: str,
    patients: Sequence[str] | None = None,
    sequences: Sequence[str] | None = None,
    labelled: bool = True,
) -> FrameIndex:
    """Index the vocalfolds layout under `root` (local or s3://).

    patients: e.g. ["patient1"]; sequences: e.g. ["seq1", "seq2"] or ["patient1/seq1"]; None selects all.
    labelled: require and index the annot/ mask of every image.
    """
    image_root = storage.join(root, "img")
    image_uris = _listing(image_root, IMAGE_SUFFIXES[:1], f"{root}: expected img/<patient>/<sequence>/<frame>.png")
    frames = []  # (patient, sequence, frame file name, image uri)
    for uri in image_uris:
        parts = storage.relative_to(uri, image_root).split("/")
        if len(parts) != 3:
            raise DataError(f"{uri}: expected img/<patient>/<sequence>/<frame>.png under {root}")
        frames.append((parts[0], parts[1], parts[2], uri))
    if not frames:
        raise DataError(f"{image_root}: no .png frames; expected img/<patient>/<sequence>/<frame>.png")

    available_patients = sorted({patient for patient, *_ in frames})
    if patients is not None:
        unknown = sorted(set(patients) - set(available_patients))
        if unknown:
            raise DataError(f"{root}: unknown patient(s) {unknown}; available: {available_patients}")
        frames = [frame for frame in frames if frame[0] in set(patients)]
    if sequences is not None:
        # A sequence is named by its folder ("seq1", in every selected patient) or as "patient1/seq1".
        available = sorted({(patient, sequence) for patient, sequence, *_ in frames})
        wanted = {
            (patient, sequence)
            for name in sequences
            for patient, sequence in available
            if name in (sequence, f"{patient}/{sequence}")
        }
        unknown = [name for name in sequences if not any(name in (s, f"{p}/{s}") for p, s in wanted)]
        if unknown:
            listed = [f"{patient}/{sequence}" for patient, sequence in available]
            raise DataError(f"{root}: unknown sequence(s) {unknown}; available: {listed}")
        frames = [frame for frame in frames if (frame[0], frame[1]) in wanted]

    masks = None
    if labelled:
        annot_root = storage.join(root, "annot")
        expectation = f"{root}: labelled=True needs annot/<patient>/<sequence>/<frame>.png"
        mask_uris = set(_listing(annot_root, MASK_SUFFIXES, expectation))
        masks = []
        for patient, sequence, name, uri in frames:
            mask_uri = storage.join(annot_root, patient, sequence, name)
            if mask_uri not in mask_uris:
                raise DataError(f"{uri}: no matching mask; expected {mask_uri}")
            masks.append(mask_uri)
    return FrameIndex(
        images=tuple(uri for *_, uri in frames),
        masks=None if masks is None else tuple(masks),
        sequences=tuple(f"{patient}/{sequence}" for patient, sequence, *_ in frames),
    )


def folder_index(root: str) -> FrameIndex:
    """Index the folder layout under `root` (local or s3://): images/, optional masks/ and a class-map file, and
    optional keep/ masks.

    Without masks/ the index is unlabelled (and keep/ unused). Files in subfolders of images/ are matched to masks/
    (and keep/) by their path below it, and their subfolder names the sequence; files directly in images/ belong to
    a sequence named after the dataset folder. When keep/ exists, every frame needs its keep mask.
    """
    image_root, mask_root = storage.join(root, "images"), storage.join(root, "masks")
    images = _by_stem(_listing(image_root, IMAGE_SUFFIXES, f"{root}: expected images/*.png|jpg"), image_root)
    if not images:
        raise DataError(f"{image_root}: no images; expected images/*.png|jpg")
    dataset_name = PurePosixPath(str(root).rstrip("/")).name or str(root)
    stems = sorted(images)
    sequences = tuple(str(PurePosixPath(stem).parent) if "/" in stem else dataset_name for stem in stems)
    if not storage.exists(mask_root):
        return FrameIndex(images=tuple(images[s] for s in stems), masks=None, sequences=sequences)

    masks = _matched(images, stems, image_root, mask_root, "mask")
    keep_root = storage.join(root, KEEP_DIR)
    keep = _matched(images, stems, image_root, keep_root, "keep mask") if storage.exists(keep_root) else None
    return FrameIndex(
        images=tuple(images[s] for s in stems),
        masks=tuple(masks[s] for s in stems),
        sequences=sequences,
        class_map=_read_class_map(root),
        keep=None if keep is None else tuple(keep[s] for s in stems),
    )


def _matched(images: dict[str, str], stems: list[str], image_root: str, root: str, what: str) -> dict[str, str]:
    """The .png under `root` of every image stem (masks/ or keep/); DataError naming the first image without one."""
    found = _by_stem(_listing(root, MASK_SUFFIXES, f"expected {what}s as .png files"), root)
    missing = [images[stem] for stem in stems if stem not in found]
    if missing:
        relative = PurePosixPath(storage.relative_to(missing[0], image_root))
        expected = storage.join(root, str(relative.with_suffix(".png")))
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: no matching {what}{more}; expected {expected}")
    return found


def load_image(uri: str) -> np.ndarray:
    """Decode one image file to (H, W, 3) uint8 RGB; DataError when it is missing or not a readable image."""
    with _open_image(uri) as image:
        return np.array(image.convert("RGB"))


def load_mask(uri: str, class_map: ClassMap | None = None) -> np.ndarray:
    """Decode one mask file to (H, W) uint8 class indices through `class_map` (default: identity)."""
    class_map = class_map or ClassMap.identity()
    with _open_image(uri) as image:
        if class_map.colour:
            rgb = np.asarray(image.convert("RGB")).astype(np.int32)
            return _map_values(uri, (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2], class_map)
        if image.mode == "1":
            image = image.convert("L")
        if image.mode in ("RGB", "RGBA", "LA"):
            rgb = np.asarray(image.convert("RGB"))
            if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                raise DataError(
                    f"{uri}: colour mask, but {class_map.source} maps grey levels; expected a single-channel mask "
                    "or 'r,g,b' keys in the class map"
                )
            values = rgb[..., 0]
        else:
            values = np.asarray(image)  # L and P (palette indices) as stored, I/I;16 as integers
        return _map_values(uri, values, class_map)


def load_keep(uri: str) -> np.ndarray:
    """Decode one keep mask to (H, W) bool (True: keep); DataError unless it is single-channel 0 (ignore) / 255."""
    with _open_image(uri) as image:
        if image.mode not in ("1", "L"):
            raise DataError(f"{uri}: keep mask has mode {image.mode}; expected a single-channel PNG of 255 and 0")
        values = np.asarray(image.convert("L"))
    odd = np.unique(values[(values != 0) & (values != 255)])
    if odd.size:
        shown = ", ".join(str(int(v)) for v in odd[:8])
        raise DataError(f"{uri}: keep mask holds values {shown}; expected 255 (keep) or 0 (ignore)")
    return values == 255


def resize_square(pixels: np.ndarray, size: int, labels: bool = False) -> np.ndarray:
    """`pixels` (H, W, 3) or (H, W) uint8 at size×size: bilinear for images, nearest for label maps, so that class
    indices and IGNORE_INDEX stay intact; unchanged when already that size."""
    if pixels.shape[:2] == (size, size):
        return pixels
    resample = Image.Resampling.NEAREST if labels else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(pixels).resize((size, size), resample))


def load_frames(index: FrameIndex, size: int | None = None, workers: int = 8) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode an index: images (N, H, W, 3) uint8 and masks (N, H, W) uint8 class indices (None if unlabelled),
    IGNORE_INDEX where the index's keep mask is 0.

    size: resize every frame to size×size (bilinear for images, nearest for masks, so IGNORE_INDEX stays intact);
    without it all frames must share one size. Files are fetched and decoded on `workers` threads, which mostly
    wait on I/O and zlib.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be positive, got {size}")

    def load(position: int) -> tuple[np.ndarray, np.ndarray | None]:
        image_uri = index.images[position]
        image = load_image(image_uri)
        mask = None
        if index.masks is not None:
            mask_uri = index.masks[position]
            mask = load_mask(mask_uri, index.class_map)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"{mask_uri}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_uri} is "
                    f"{image.shape[1]}x{image.shape[0]}; expected equal sizes"
                )
            if index.keep is not None:
                keep_uri = index.keep[position]
                keep = load_keep(keep_uri)
                if keep.shape != mask.shape:
                    raise DataError(
                        f"{keep_uri}: keep mask is {keep.shape[1]}x{keep.shape[0]} but its mask {mask_uri} is "
                        f"{mask.shape[1]}x{mask.shape[0]}; expected equal sizes"
                    )
                mask = np.where(keep, mask, np.uint8(IGNORE_INDEX))
        if size is not None:
            image = resize_square(image, size)
            mask = None if mask is None else resize_square(mask, size, labels=True)
        return image, mask

    if workers > 1 and len(index) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(index))) as pool:
            loaded = list(pool.map(load, range(len(index))))
    else:
        loaded = [load(position) for position in range(len(index))]
    if not loaded:
        empty_masks = None if index.masks is None else np.zeros((0, size or 0, size or 0), np.uint8)
        return np.zeros((0, size or 0, size or 0, 3), np.uint8), empty_masks

    first_shape = loaded[0][0].shape
    for position, (image, _) in enumerate(loaded):
        if image.shape != first_shape:
            raise DataError(
                f"{index.images[position]}: image is {image.shape[1]}x{image.shape[0]} but "
                f"{index.images[0]} is {first_shape[1]}x{first_shape[0]}; expected one size (or pass size=)"
            )
    images = np.stack([image for image, _ in loaded])
    masks = None if index.masks is None else np.stack([mask for _, mask in loaded])
    return images, masks


def write_folder_dataset(
    out_uri: str,
    images: np.ndarray,
    masks: np.ndarray | None,
    names: Sequence[str] | None = None,
    workers: int = 8,
    class_names: Sequence[str] = CLASS_NAMES,
) -> None:
    """Write images/<name>.png, masks/<name>.png (our class indices) and classes.json under `out_uri` (local or
    s3://), so that `folder_index(out_uri)` reads the set back, e.g. a style-translated simulator set.

    names: one per frame, unique, without suffix ('/' makes subfolders, i.e. sequences); default 000000, 000001...
    class_names: what mask values 0, 1, ... are (a label set of classes.py), written to classes.json.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {images.shape} dtype {images.dtype}")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != images.shape[:3] or masks.dtype != np.uint8:
            raise ValueError(f"masks must be (N, H, W) uint8 matching images {images.shape[:3]}, got {masks.shape}")
        if masks.size and int(masks.max()) >= len(class_names):
            raise ValueError(f"masks hold class {int(masks.max())}; expected indices below {len(class_names)}")
    names = [f"{i:06d}" for i in range(len(images))] if names is None else [str(name) for name in names]
    if len(names) != len(images) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(images)} unique strings, got {len(names)} ({len(set(names))} unique)")

    def write(position: int) -> None:
        storage.write_bytes(storage.join(out_uri, "images", f"{names[position]}.png"), _png(images[position]))
        if masks is not None:
            storage.write_bytes(storage.join(out_uri, "masks", f"{names[position]}.png"), _png(masks[position]))

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(images)))) as pool:
        list(pool.map(write, range(len(images))))
    if masks is not None:
        identity = {str(index): name for index, name in enumerate(class_names)}
        storage.write_bytes(storage.join(out_uri, "classes.json"), json.dumps(identity, indent=2).encode())


def _listing(uri: str, suffixes: tuple[str, ...], expectation: str) -> list[str]:
    try:
        return storage.list_files(uri, suffixes)
    except FileNotFoundError as error:
        raise DataError(f"{uri}: not found; {expectation}") from error


def _by_stem(uris: list[str], root: str) -> dict[str, str]:
    """Map 'sub/dir/name' (path below root without suffix) to the URI; DataError on two files with one stem."""
    found: dict[str, str] = {}
    for uri in uris:
        relative = PurePosixPath(storage.relative_to(uri, root))
        stem = str(relative.with_suffix(""))
        if stem in found:
            raise DataError(f"{uri}: same name as {found[stem]}; expected one file per frame name")
        found[stem] = uri
    return found


def _read_class_map(root: str) -> ClassMap:
    for name in CLASS_MAP_FILES:
        uri = storage.join(root, name)
        try:
            text = storage.read_bytes(uri).decode("utf-8")
        except FileNotFoundError:
            continue
        except UnicodeDecodeError as error:
            raise DataError(f"{uri}: not UTF-8 text; expected a class map") from error
        try:
            if name.endswith(".json"):
                mapping = json.loads(text)
            else:
                import yaml  # deferred: only YAML class maps need it

                mapping = yaml.safe_load(text)
        except Exception as error:  # json.JSONDecodeError or yaml.YAMLError
            raise DataError(f"{uri}: unreadable ({error}); expected a mapping of mask values to class names") from error
        return ClassMap.from_names(mapping, source=uri)
    raise DataError(
        f"{root}: masks/ present but no {' or '.join(CLASS_MAP_FILES[:2])}; expected a map of mask values to class "
        f'names, e.g. {{"0": "void", "255": "vocal_folds"}}'
    )


def _open_image(uri: str) -> Image.Image:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as error:
        raise DataError(f"{uri}: file not found; expected an image") from error
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: truncated files fail here rather than later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{uri}: cannot decode ({error}); expected a PNG or JPEG image") from error
    return image


def _map_values(uri: str, values: np.ndarray, class_map: ClassMap) -> np.ndarray:
    """Stored mask values -> class indices through a lookup table; DataError naming any value not in the map."""
    if values.size == 0:
        return values.astype(np.uint8)
    if values.dtype.kind == "f":
        if not np.all(np.mod(values, 1) == 0):
            raise DataError(f"{uri}: mask holds fractional values; expected integer mask values")
        values = values.astype(np.int64)
    lowest, highest = int(values.min()), int(values.max())
    unknown: list[int] = []
    if lowest >= 0 and highest < (1 << 16):  # small non-negative values: one lookup table
        table = np.full(highest + 1, _UNMAPPED, np.uint8)
        for value, label in class_map.values.items():
            if value <= highest:
                table[value] = label
        mapped = table[values]
        bad = mapped == _UNMAPPED
        if bad.any():
            unknown = [int(v) for v in np.unique(values[bad])]
    else:
        present, inverse = np.unique(values, return_inverse=True)
        unknown = [int(v) for v in present if int(v) not in class_map.values]
        mapped = np.array([class_map.values.get(int(v), _UNMAPPED) for v in present], np.uint8)[inverse]
        mapped = mapped.reshape(values.shape)
    if unknown:
        shown = [f"({v >> 16},{(v >> 8) & 255},{v & 255})" if class_map.colour else str(v) for v in unknown[:8]]
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise DataError(
            f"{uri}: mask values {', '.join(shown)}{more} are not in {class_map.source}; "
            f"expected one of {class_map.describe_values()}"
        )
    return mapped


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
