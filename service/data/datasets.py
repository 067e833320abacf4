"""Labelled image sets for any model: an .npz, a folder of class folders (torchvision's ImageFolder layout), a zip of
one, and the server-side names `mnist:train|val|test|all` and `data:<name>`.

Every reader is strict: the first bad item refuses the whole set with a DatasetError that names it, and nothing is
returned half-read. Sizes are checked before anything is unpacked or decoded: member counts and declared sizes of
archives, array sizes from their .npy headers (service.data.arrays), image sizes from their headers
(service.data.images).
"""

from __future__ import annotations

import io
import math
import posixpath
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.data.arrays import ArrayFileError, read_npz
from service.data.images import ImageInputError, InputLimits, decode_image, sniff_format

IMAGE_KEYS = ("images", "x")
LABEL_KEYS = ("labels", "y")
CLASS_NAMES_KEY = "class_names"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
JUNK = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")  # what archivers and file browsers leave behind
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
MNIST_SPLITS = ("train", "val", "test", "all")
MNIST_NAMES = tuple(f"mnist:{s}" for s in MNIST_SPLITS)
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_CLASS_NAMES_BYTES = 1 << 20
STATUS = {"too_many_items": 413, "too_large": 413, "unsafe_archive": 400, "invalid_name": 400, "not_found": 404}


class DatasetError(ValueError):
    """A refused dataset: `code` is machine-readable, the message names the item that failed, `status` is the
    HTTP status a job submission answers with (400, 404, 413 or 422)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS.get(code, 422)


@dataclass(frozen=True)
class DatasetLimits:
    """Limits on one dataset: items, bytes (its file, its archive's declared unpacked size, its decoded float32
    images; each), and each image's declared size."""

    max_items: int = 50000
    max_bytes: int = 2048 * 1024 * 1024
    max_side: int = 4096
    max_pixels: int = 4096 * 4096


@dataclass
class LabelledImages:
    """Images (N, C, H, W) float32 in [0, 1], labels (N,) int64, a name per item, where they came from, and the
    class names in label order (when the source names them)."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]
    source: str
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledImages:
        """The items at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return LabelledImages(self.images[idx], self.labels[idx], [self.names[i] for i in idx.tolist()], self.source,
                              self.class_names)

    def describe(self) -> dict:
        """JSON-able summary: source, count, [C, H, W] and the count of each class (by name when known)."""
        k = len(self.class_names) if self.class_names else (int(self.labels.max()) + 1 if len(self) else 0)
        counts = np.bincount(self.labels, minlength=k) if len(self) else np.zeros(k, np.int64)
        keys = self.class_names or [str(c) for c in range(len(counts))]
        return {"source": self.source, "count": len(self), "shape": [int(d) for d in self.images.shape[1:]],
                "per_class": {str(keys[c]) if c < len(keys) else str(c): int(n) for c, n in enumerate(counts)}}


def _as_limits(limits: DatasetLimits | InputLimits) -> DatasetLimits:
    """DatasetLimits; an InputLimits gives its image sizes (the item and byte limits keep their defaults)."""
    if isinstance(limits, DatasetLimits):
        return limits
    return DatasetLimits(max_side=limits.max_side, max_pixels=limits.max_pixels)


# ---------------------------------------------------------------------------------------------------- entry point

def read_labelled(source: Path | bytes, *, name: str, shape: tuple[int, int, int] | None, num_classes: int | None,
                  class_names: list[str] | None = None, limits: DatasetLimits | InputLimits = DatasetLimits(),
                  resize: bool = False, limit: int | None = None) -> LabelledImages:
    """A labelled set from a path (.npz, .zip, or a folder of class folders) or the bytes of an .npz / .zip.

    `name` names the set in item names and messages (`<name>[17]` for .npz rows). `shape` / `num_classes` None:
    taken from the data (the first image; the labels or folders). `resize`: images of another size are resized
    (bilinear) rather than refused. `limit`: only the first N items (for folders, the stratified order below)."""
    return _read(source, name=name, shown=str(source) if isinstance(source, Path) else name, shape=shape,
                 num_classes=num_classes, class_names=class_names, limits=_as_limits(limits), resize=resize,
                 limit=limit)


def _read(source: Path | bytes, *, name: str, shown: str, shape: tuple[int, int, int] | None,
          num_classes: int | None, class_names: list[str] | None, limits: DatasetLimits, resize: bool,
          limit: int | None) -> LabelledImages:
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    if limit is not None and limit < 1:
        raise DatasetError("bad_limit", f"{name}: limit must be at least 1, not {limit}")
    shape = None if shape is None else (int(shape[0]), int(shape[1]), int(shape[2]))
    args = dict(name=name, shown=shown, shape=shape, num_classes=num_classes, class_names=class_names,
                limits=limits, resize=resize, limit=limit)
    if isinstance(source, bytes | bytearray | memoryview):
        data, suffix = bytes(source), Path(name).suffix.lower()
    else:
        path = Path(source)
        if path.is_dir():
            return _read_layout(_folder_items(path, name, limits), "image folder", **args)
        if not path.is_file():
            raise DatasetError("not_found", f"{name}: no such file or folder: {path}")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise DatasetError("too_large", f"{name}: the file is {size} bytes, over the limit of {limits.max_bytes}")
        data, suffix = path.read_bytes(), path.suffix.lower()
    if len(data) > limits.max_bytes:
        raise DatasetError("too_large", f"{name}: {len(data)} bytes, over the limit of {limits.max_bytes}")
    if suffix == ".npz" or (suffix != ".zip" and _holds_arrays(data)):
        return _read_npz(data, **args)
    if suffix == ".zip" or data[:2] == b"PK":
        return _read_layout(_zip_items(data, name, limits), "zip of image folders", **args)
    raise DatasetError("unsupported_format", f"{name}: not an .npz, a .zip of class folders or a folder of them")


def _holds_arrays(data: bytes) -> bool:
    """A zip whose members are all .npy files (an .npz without its suffix)."""
    try:
        names = [n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _describe(shown: str, fmt: str, images: np.ndarray, labels: np.ndarray, classes: int) -> str:
    c, h, w = images.shape[1:]
    return f"{shown} ({fmt}: {len(labels)} images {c}x{h}x{w}, {classes} classes)"


def check_fits(data: LabelledImages, shape: tuple[int, int, int] | None, num_classes: int | None,
               what: str) -> LabelledImages:
    """`data` when its images have `shape` and its labels are class indices below `num_classes` (None: not
    checked); else DatasetError naming the set (shape) or the first bad item (label)."""
    if shape is not None and tuple(data.images.shape[1:]) != tuple(shape):
        have = "x".join(map(str, data.images.shape[1:]))
        code = "wrong_channels" if data.images.shape[1] != shape[0] else "wrong_shape"
        raise DatasetError(code, f"{what} has {have} images but the model takes {'x'.join(map(str, shape))}")
    _check_labels(data.labels, num_classes, lambda i: data.names[i])
    return data


def _check_labels(labels: np.ndarray, num_classes: int | None, item: Callable[[int], str]) -> None:
    bad = (labels < 0) | (labels >= num_classes) if num_classes is not None else labels < 0
    if bad.any():
        i = int(np.argmax(bad))
        allowed = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        raise DatasetError("bad_label", f"{item(i)}: label {int(labels[i])} is not a class index ({allowed})")


# ------------------------------------------------------------------------------------------------------------ .npz

def _read_npz(data: bytes, *, name: str, shown: str, shape: tuple[int, int, int] | None, num_classes: int | None,
              class_names: list[str] | None, limits: DatasetLimits, resize: bool,
              limit: int | None) -> LabelledImages:
    """An .npz of images ('images' or 'x') and integer labels ('labels' or 'y'), optionally 'class_names' (text)."""
    data, file_classes = _take_class_names(data, name, limits)
    budget = limits.max_bytes
    if shape is not None and not resize:
        budget = min(budget, limits.max_items * (math.prod(shape) + 1))
    try:
        arrays = read_npz(data, budget, limits.max_bytes, name)
    except ArrayFileError as exc:
        raise DatasetError("too_large" if exc.code == "array_too_large" else "unreadable_item", exc.message) from exc
    key = next((k for k in IMAGE_KEYS if k in arrays), None)
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    found = ", ".join(sorted(arrays)) or "none"
    if key is None:
        raise DatasetError("missing_array", f"{name}: no image array: name it 'images' or 'x' (arrays: {found})")
    if label_key is None:
        raise DatasetError("missing_labels", f"{name}: no labels: an integer array 'labels' or 'y' is needed "
                           f"(arrays: {found})")
    images, labels = _layout(arrays[key], shape, name, limits), arrays[label_key]
    n = images.shape[0]
    if n == 0:
        raise DatasetError("empty", f"{name}: the image array '{key}' holds no image")
    if n > limits.max_items:
        raise DatasetError("too_many_items", f"{name}: {n} images, over the limit of {limits.max_items}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DatasetError("bad_label", f"{name}: '{label_key}' has shape {list(labels.shape)}, not [{n}]: one label "
                           "per image")
    if labels.dtype.kind not in "iu":
        raise DatasetError("bad_label", f"{name}: '{label_key}' must hold integers (class indices), not {labels.dtype}")
    if file_classes is not None:
        if num_classes is not None and len(file_classes) > num_classes:
            raise DatasetError("too_many_classes", f"{name}: '{CLASS_NAMES_KEY}' names {len(file_classes)} classes "
                               f"but the model has {num_classes}")
        num_classes = len(file_classes) if num_classes is None else num_classes
    _check_labels(labels, num_classes, lambda i: f"{name}[{i}]")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    values = _unit_values(images, name)
    values = _resized(values, shape, name, resize)
    out_classes = file_classes or (list(class_names) if class_names and len(class_names) == num_classes else None)
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    return LabelledImages(values, labels.astype(np.int64), [f"{name}[{i}]" for i in range(len(labels))],
                          _describe(shown, ".npz", values, labels, k), out_classes)


def _layout(array: np.ndarray, shape: tuple[int, int, int] | None, name: str, limits: DatasetLimits) -> np.ndarray:
    """(N, C, H, W) from (N, C, H, W), (N, H, W) when C == 1, or (N, H, W, C) when only the last axis matches C."""
    channels = None if shape is None else shape[0]
    if array.ndim == 3 and channels in (None, 1):
        array = array[:, None]
    elif array.ndim == 4:
        fits = (lambda d: d in (1, 3, 4)) if channels is None else (lambda d: d == channels)
        if fits(array.shape[3]) and not fits(array.shape[1]) and not fits(array.shape[2]):
            array = array.transpose(0, 3, 1, 2)
    else:
        wanted = "[N, C, H, W], [N, H, W, C]" + (" or [N, H, W]" if channels in (None, 1) else "")
        raise DatasetError("wrong_shape", f"{name}: the image array has shape {list(array.shape)}, not {wanted}")
    c, h, w = array.shape[1:]
    if channels is not None and c != channels:
        raise DatasetError("wrong_channels", f"{name}: the images (array shape {list(array.shape)}) have {c} "
                           f"channels but the model takes {channels}")
    if min(c, h, w) < 1:
        raise DatasetError("wrong_shape", f"{name}: images of shape {[c, h, w]} hold no pixels")
    if max(h, w) > limits.max_side or h * w > limits.max_pixels:
        raise DatasetError("too_large", f"{name}: images of {w}x{h} pixels are over the limits ({limits.max_side} "
                           f"per side, {limits.max_pixels} in all)")
    if array.shape[0] * c * h * w * 4 > limits.max_bytes:
        raise DatasetError("too_large", f"{name}: {array.shape[0]} images of {c}x{h}x{w} take more than "
                           f"{limits.max_bytes} bytes as float32")
    return array


def _unit_values(images: np.ndarray, name: str) -> np.ndarray:
    """float32 in [0, 1]: uint8 divided by 255; floats must be finite and in [0, 1] already."""
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0)
    if images.dtype.kind != "f":
        raise DatasetError("bad_dtype", f"{name}: images of dtype {images.dtype}: give uint8 (0-255) or floats in "
                           "[0, 1]")
    flat = images.reshape(images.shape[0], -1)
    bad = ~(np.isfinite(flat) & (flat >= 0) & (flat <= 1)).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        row = flat[i]
        value = row[~(np.isfinite(row) & (row >= 0) & (row <= 1))][0]
        raise DatasetError("out_of_range", f"{name}[{i}]: pixel value {float(value):g} is not a finite number in "
                           "[0, 1] (8-bit images: save them as uint8)")
    return np.ascontiguousarray(images, dtype=np.float32)


def _resized(images: np.ndarray, shape: tuple[int, int, int] | None, name: str, resize: bool) -> np.ndarray:
    if shape is None or tuple(images.shape[2:]) == tuple(shape[1:]):
        return images
    h, w = images.shape[2:]
    if not resize:
        raise DatasetError("wrong_shape", f"{name}: the images are {w}x{h} but the model takes {shape[2]}x{shape[1]}; "
                           "resize them (or ask for resize)")
    import torch
    import torch.nn.functional as F

    out = F.interpolate(torch.from_numpy(images), size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    return out.clamp(0, 1).numpy()


def _take_class_names(data: bytes, name: str, limits: DatasetLimits) -> tuple[bytes, list[str] | None]:
    """The .npz without its text member 'class_names' (read here: service.data.arrays reads numbers only), and
    those names. The members' declared sizes are checked before any is unpacked."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DatasetError("unreadable_item", f"{name} is not a readable .npz (zip) archive: {exc}") from exc
    member = next((m for m in infos if m.filename == f"{CLASS_NAMES_KEY}.npy"), None)
    if member is None:
        return data, None
    declared = sum(m.file_size for m in infos)
    if member.file_size > MAX_CLASS_NAMES_BYTES or declared > limits.max_bytes:
        raise DatasetError("too_large", f"{name}: unpacks to {declared} bytes ('{member.filename}': "
                           f"{member.file_size}), over the limits")
    what = f"{name}: member '{member.filename}'"
    try:
        raw = archive.read(member)
        stream = io.BytesIO(raw)
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        dims, fortran, dtype = read(stream)
        body = raw[stream.tell():]
        if dtype.kind != "U" or len(dims) != 1 or dims[0] * dtype.itemsize != len(body):
            raise ValueError(f"must be a 1-D array of text, not {dtype} of shape {list(dims)}")
        names = [str(s) for s in np.frombuffer(body, dtype=dtype)]
        rest = io.BytesIO()
        with zipfile.ZipFile(rest, "w", zipfile.ZIP_STORED) as out:
            for info in infos:
                if info is not member:
                    out.writestr(info.filename, archive.read(info))
    except Exception as exc:  # noqa: BLE001 - numpy parses the header as a Python literal (any error), CRC, truncation
        raise DatasetError("unreadable_item", f"{what}: {exc}") from exc
    return rest.getvalue(), names


# --------------------------------------------------------------------------------------- folders of class folders

@dataclass
class _Item:
    folder: str  # the class folder
    name: str  # "<folder>/<file>"
    size: int  # bytes (declared, in a zip)
    read: Callable[[], bytes]


def _junk(part: str) -> bool:
    return part.startswith(".") or part in JUNK


def _image_file(item_name: str, what: str) -> None:
    if not item_name.lower().endswith(IMAGE_SUFFIXES):
        raise DatasetError("unreadable_item", f"{what}: {item_name} is not a PNG or JPEG file (.png, .jpg, .jpeg)")


def _folder_items(root: Path, what: str, limits: DatasetLimits) -> tuple[list[str], list[_Item]]:
    """Class folders (sorted) and their image files of a folder in the ImageFolder layout."""
    folders, items = [], []
    for entry in sorted(root.iterdir()):
        if _junk(entry.name):
            continue
        if not entry.is_dir():
            raise DatasetError("bad_layout", f"{what}: {entry.name} lies beside the class folders: each image goes "
                               "into the folder of its class")
        folders.append(entry.name)
        for file in sorted(entry.iterdir()):
            if _junk(file.name):
                continue
            item_name = f"{entry.name}/{file.name}"
            if file.is_dir():
                raise DatasetError("bad_layout", f"{what}: {item_name}/ is a folder inside a class folder")
            _image_file(item_name, what)
            items.append(_Item(entry.name, item_name, file.stat().st_size, file.read_bytes))
            if len(items) > limits.max_items:
                raise DatasetError("too_many_items", f"{what}: more than {limits.max_items} images (at {item_name})")
    return folders, items


def safe_member(name: str) -> bool:
    """A zip member name that stays inside the archive: relative, no '..', no drive or backslash tricks."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return False
    return ".." not in posixpath.normpath(name).split("/")


def is_symlink(info: zipfile.ZipInfo) -> bool:
    """A zip member stored as a symbolic link (Unix mode in its external attributes)."""
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _zip_items(data: bytes, what: str, limits: DatasetLimits) -> tuple[list[str], list[_Item]]:
    """Class folders and image members of a zip of the folder layout, with or without one folder above them.
    Unsafe members, too many members and too large declared sizes are refused before anything is unpacked."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DatasetError("unreadable_item", f"{what} is not a readable zip archive: {exc}") from exc
    files, dirs = [], set()
    for info in infos:
        if not safe_member(info.filename) or is_symlink(info):
            raise DatasetError("unsafe_archive", f"{what}: member {info.filename!r} escapes the archive (absolute "
                               "path, '..' or symbolic link)")
        parts = [p for p in info.filename.split("/") if p]
        if any(_junk(p) for p in parts):
            continue
        if info.is_dir():
            dirs.add(tuple(parts))
            continue
        if info.file_size > limits.max_bytes:
            raise DatasetError("too_large", f"{what}: member {info.filename!r} declares {info.file_size} bytes, over "
                               f"the limit of {limits.max_bytes}")
        files.append((parts, info))
    if len(files) > limits.max_items:
        raise DatasetError("too_many_items", f"{what} holds {len(files)} files, over the limit of {limits.max_items}")
    declared = sum(info.file_size for _, info in files)
    if declared > limits.max_bytes:
        raise DatasetError("too_large", f"{what} unpacks to {declared} bytes, over the limit of {limits.max_bytes}")
    dirs |= {tuple(parts[:i]) for parts, _ in files for i in range(1, len(parts))}
    tops = {d[0] for d in dirs} | {parts[0] for parts, _ in files}
    if len(tops) == 1 and all(len(parts) >= 3 for parts, _ in files) and any(len(d) == 2 for d in dirs):
        dirs = {d[1:] for d in dirs if len(d) > 1}  # one folder above the class folders
        files = [(parts[1:], info) for parts, info in files]
    for d in sorted(dirs):
        if len(d) > 1:
            raise DatasetError("bad_layout", f"{what}: {'/'.join(d)}/ is a folder inside a class folder")
    items = []
    for parts, info in sorted(files, key=lambda f: f[0]):
        if len(parts) != 2:
            raise DatasetError("bad_layout", f"{what}: member {info.filename!r} lies beside the class folders: each "
                               "image goes into the folder of its class")
        item_name = "/".join(parts)
        _image_file(item_name, what)
        items.append(_Item(parts[0], item_name, info.file_size, _member_reader(archive, info, what)))
    return sorted(d[0] for d in dirs), items


def _member_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return archive.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise DatasetError("unreadable_item", f"{what}: member {info.filename!r} cannot be unpacked (corrupt, "
                               f"truncated or encrypted): {exc}") from exc
    return read


def class_labels(folders: Sequence[str], num_classes: int | None, class_names: Sequence[str] | None,
                 what: str = "the dataset") -> tuple[dict[str, int], list[str]]:
    """Label of each class folder, and the class names in label order. By the model's class names when every
    folder is one; else by number when every folder is a whole number (refused when one is not below
    `num_classes`); else sorted folder order (torchvision's ImageFolder), refused for more folders than classes."""
    if class_names and all(f in class_names for f in folders):
        return {f: list(class_names).index(f) for f in folders}, list(class_names)
    if folders and all(re.fullmatch(r"[0-9]+", f) for f in folders):
        values = {f: int(f) for f in folders}
        k = num_classes if num_classes is not None else max(values.values()) + 1
        for f in folders:
            if values[f] >= k:
                raise DatasetError("bad_label", f"{what}: class folder {f!r} is not a class index 0..{k - 1}")
        seen: dict[int, str] = {}
        for f in folders:
            if values[f] in seen:
                raise DatasetError("bad_label", f"{what}: class folders {seen[values[f]]!r} and {f!r} name the same "
                                   "class")
            seen[values[f]] = f
        names = list(class_names) if class_names and len(class_names) == k else [str(c) for c in range(k)]
        return values, names
    ordered = sorted(folders)
    if num_classes is not None and len(ordered) > num_classes:
        raise DatasetError("too_many_classes", f"{what}: {len(ordered)} class folders ({', '.join(ordered[:12])}"
                           f"{', ...' if len(ordered) > 12 else ''}) but the model has {num_classes} classes")
    return {f: i for i, f in enumerate(ordered)}, ordered


def _stratified_order(items: list[_Item], labels: dict[str, int]) -> list[_Item]:
    """Each class's files in name order, the classes interleaved in proportion to their sizes: any prefix (a
    `limit`) is a sample of every class, and the order depends only on the names."""
    by_class: dict[str, list[_Item]] = {}
    for item in items:
        by_class.setdefault(item.folder, []).append(item)
    keyed = [(((rank + 0.5) / len(group), labels[folder], item.name), item)
             for folder, group in by_class.items() for rank, item in enumerate(sorted(group, key=lambda i: i.name))]
    return [item for _, item in sorted(keyed, key=lambda pair: pair[0])]


def _infer_shape(data: bytes, item: str, what: str, limits: DatasetLimits) -> tuple[int, int, int]:
    """[C, H, W] of the first image from its header: 1 channel for grey modes, else 3."""
    from PIL import Image

    try:
        if sniff_format(data) not in ("png", "jpeg"):
            raise ImageInputError("unsupported_format", "not a PNG or JPEG file")
        img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except ImageInputError as exc:
        raise DatasetError("unreadable_item", f"{what}: {item}: {exc.message}") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad header (and DecompressionBombError)
        raise DatasetError("unreadable_item", f"{what}: {item}: the image header cannot be read: {exc}") from exc
    width, height = img.size
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise DatasetError("too_large", f"{what}: {item} declares {width}x{height} pixels, over the limits "
                           f"({limits.max_side} per side, {limits.max_pixels} in all)")
    return (1 if img.mode in GRAY_MODES else 3), height, width


ITEM_CODES = {"wrong_shape": "wrong_shape", "wrong_channels": "wrong_channels", "image_too_large": "too_large"}


def _read_layout(listing: tuple[list[str], list[_Item]], fmt: str, *, name: str, shown: str,
                 shape: tuple[int, int, int] | None, num_classes: int | None, class_names: list[str] | None,
                 limits: DatasetLimits, resize: bool, limit: int | None) -> LabelledImages:
    """Decode the images of class folders (all or nothing): labels by `class_labels`, sizes checked first."""
    folders, items = listing
    if not folders:
        raise DatasetError("empty", f"{name}: no class folders (the layout is <class>/<image>.png)")
    counts = {f: 0 for f in folders}
    for item in items:
        counts[item.folder] += 1
    for folder, count in counts.items():
        if count == 0:
            raise DatasetError("empty", f"{name}: class folder {folder!r} holds no image")
    labels_of, names = class_labels(folders, num_classes, class_names, name)
    total = sum(item.size for item in items)
    if total > limits.max_bytes:
        raise DatasetError("too_large", f"{name}: its files hold {total} bytes, over the limit of {limits.max_bytes}")
    items = _stratified_order(items, labels_of)[:limit]
    first = items[0].read()
    shape = shape or _infer_shape(first, items[0].name, name, limits)
    if len(items) * math.prod(shape) * 4 > limits.max_bytes:
        raise DatasetError("too_large", f"{name}: {len(items)} images of {'x'.join(map(str, shape))} take more than "
                           f"{limits.max_bytes} bytes as float32")
    image_limits = InputLimits(max_side=limits.max_side, max_pixels=limits.max_pixels, max_batch=1)
    images = np.empty((len(items), *shape), np.float32)
    for i, item in enumerate(items):
        data = first if i == 0 else item.read()
        try:
            if sniff_format(data) not in ("png", "jpeg"):
                raise ImageInputError("unsupported_format", "the file is not a PNG or JPEG file (by its first bytes)")
            images[i] = decode_image(data, shape, image_limits, resize).images[0].numpy()
        except ImageInputError as exc:
            code = ITEM_CODES.get(exc.code, "unreadable_item")
            raise DatasetError(code, f"{name}: {item.name}: {exc.message}") from exc
    labels = np.asarray([labels_of[item.folder] for item in items], dtype=np.int64)
    return LabelledImages(images, labels, [item.name for item in items],
                          _describe(shown, fmt, images, labels, len(names)), names)


# ---------------------------------------------------------------------------------------------------------- split

def split(data: LabelledImages, test_fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """(rest, test): `test_fraction` of each class (largest remainders, so the test part has round(f * N)
    images) drawn with `seed`; each part keeps the data's order. Refused when a part would be empty."""
    if not 0 < test_fraction < 1:
        raise DatasetError("bad_fraction", f"test_fraction must lie strictly between 0 and 1, not {test_fraction}")
    n = len(data)
    classes, sizes = np.unique(data.labels, return_counts=True)
    quota = test_fraction * sizes
    take = np.floor(quota).astype(np.int64)
    extra = int(round(test_fraction * n)) - int(take.sum())
    if extra > 0:
        order = sorted(range(len(classes)), key=lambda c: (-(quota[c] - take[c]), c))
        take[order[:extra]] += 1
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for c, k in zip(classes, take, strict=True):
        test += rng.permutation(np.flatnonzero(data.labels == c))[:k].tolist()
    mask = np.zeros(n, bool)
    mask[test] = True
    for part, what in ((mask, "test"), (~mask, "other")):
        if not part.any():
            raise DatasetError("empty", f"{data.source}: splitting {n} images with test_fraction {test_fraction} "
                               f"leaves the {what} part empty")
    return data.subset(np.flatnonzero(~mask)), data.subset(np.flatnonzero(mask))


# ------------------------------------------------------------------------------------------------- named datasets

def named_datasets(folders: Sequence[Path]) -> dict[str, Path]:
    """Datasets of the operator's folders by name: each sub-folder `<folder>/<name>/` (ImageFolder layout) and
    each `<folder>/<name>.npz`. The first folder that has a name wins; within one, the sub-folder."""
    out: dict[str, Path] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                name = entry.name
            elif entry.suffix == ".npz" and entry.is_file():
                name = entry.stem
            else:
                continue
            if DATASET_NAME.fullmatch(name):
                out.setdefault(name, entry)
    return out


def load_named(name: str, folders: Sequence[Path], shape: tuple[int, int, int] | None = None,
               num_classes: int | None = None, class_names: list[str] | None = None,
               limits: DatasetLimits | InputLimits = DatasetLimits(), limit: int | None = None,
               resize: bool = False) -> LabelledImages:
    """`data:<name>` (or `<name>`) from the operator's folders only: a name is never a path."""
    bare = name.removeprefix("data:")
    if "/" in bare or "\\" in bare or ".." in bare or not DATASET_NAME.fullmatch(bare):
        raise DatasetError("invalid_name", f"dataset name {name!r}: letters, digits, '.', '_' and '-' only (a name, "
                           "not a path)")
    known = named_datasets(folders)
    if bare not in known:
        listed = ", ".join(f"data:{k}" for k in sorted(known)) or "none configured"
        raise DatasetError("unknown_dataset", f"unknown dataset 'data:{bare}' (server-side datasets: {listed})")
    return _read(known[bare], name=f"data:{bare}", shown=f"data:{bare}", shape=shape, num_classes=num_classes,
                 class_names=class_names, limits=_as_limits(limits), resize=resize, limit=limit)


def load_dataset_by_name(name: str, folders: Sequence[Path], shape: tuple[int, int, int] | None,
                         num_classes: int | None, class_names: list[str] | None,
                         limits: DatasetLimits | InputLimits = DatasetLimits(),
                         limit: int | None = None) -> LabelledImages:
    """A server-side dataset: `mnist:train|val|test|all` (the bundled digits) or `data:<name>` (the operator's
    folders), checked against `shape` and `num_classes` when given; `limit`: its first N items."""
    if name.startswith("data:"):
        return load_named(name, folders, shape, num_classes, class_names, limits, limit)
    if name in MNIST_NAMES:
        from service.data.sources import mnist

        data = mnist(name.split(":", 1)[1])
        if limit is not None:
            data = data.subset(np.arange(min(limit, len(data))))
        return check_fits(data, shape, num_classes, name)
    known = [*MNIST_NAMES, *(f"data:{k}" for k in sorted(named_datasets(folders)))]
    raise DatasetError("unknown_dataset", f"unknown dataset {name!r} (known: {', '.join(known)})")
