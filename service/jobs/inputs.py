"""A job's images: uploads (.npz, .npy, a zip of PNG/JPEG files, or many files) checked and decoded at submission,
or a server-side dataset name. What fails as a whole is refused (JobInputError, 4xx); a bad item inside a good
archive becomes an ItemError in the job's report, and the valid items go on."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service.config import Settings
from service.data.arrays import ArrayFileError, read_npz
from service.data.datasets import (
    DatasetError,
    DatasetLimits,
    LabelledImages,
    is_symlink,
    load_dataset_by_name,
    read_labelled,
    safe_member,
)
from service.data.images import ImageInputError, InputLimits, decode_image, max_values, tensor_batch
from service.jobs.types import ItemError, JobInputError, check_deadline

if TYPE_CHECKING:
    pass

IMAGE_KEYS = ("images", "x", "adversarial")
LABEL_KEYS = ("labels", "y")
SKIPPED_MEMBERS = ("__MACOSX/", ".DS_Store")


@dataclass
class StagedImages:
    """Validated images (N, C, H, W) float32 in [0, 1], optional labels, a name per image, and the bad items."""

    images: np.ndarray
    labels: np.ndarray | None
    names: list[str]
    errors: list[ItemError] = field(default_factory=list)


def limits_of(settings: Settings) -> InputLimits:
    return InputLimits(max_side=settings.max_image_side, max_pixels=settings.max_image_pixels,
                       max_batch=settings.jobs_max_items)


def dataset_limits(settings: Settings) -> DatasetLimits:
    """The settings' limits on one labelled dataset."""
    return DatasetLimits(max_items=settings.dataset_max_items, max_bytes=int(settings.dataset_max_mb * 1024 * 1024),
                         max_side=settings.max_image_side, max_pixels=settings.max_image_pixels)


def job_input_error(exc: DatasetError) -> JobInputError:
    """A refused dataset as the job API's error (same code, status and message)."""
    return JobInputError(exc.message, code=exc.code, status=exc.status)


def open_named_dataset(name: str, settings: Settings, shape: tuple[int, int, int] | None = None,
                       num_classes: int | None = None, class_names: list[str] | None = None,
                       limit: int | None = None) -> LabelledImages:
    """A server-side dataset (`mnist:*`, `data:<name>` in settings.dataset_folders), checked against the shape and
    classes when given; JobInputError when refused."""
    try:
        return load_dataset_by_name(name, settings.dataset_folders, shape, num_classes, class_names,
                                    dataset_limits(settings), limit)
    except DatasetError as exc:
        raise job_input_error(exc) from exc


def load_dataset(name: str, limit: int | None, settings: Settings, shape: tuple[int, int, int] | None = None,
                 num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A server-side dataset by name ('mnist:test', 'data:<name>'): images and labels as numpy arrays."""
    data = open_named_dataset(name, settings, shape, num_classes, limit=limit)
    return data.images, data.labels


def check_dataset_shape(name: str, shape: tuple[int, int, int], settings: Settings) -> None:
    """The dataset's images must fit the model's input shape (checked on its first image; every image is checked
    when the job loads it)."""
    open_named_dataset(name, settings, tuple(shape), limit=1)


def stage_labelled_upload(files: list[tuple[str, bytes]], shape: tuple[int, int, int], num_classes: int | None,
                          class_names: list[str] | None, settings: Settings) -> LabelledImages:
    """One labelled upload, strictly: an .npz (images, labels) or a .zip of class folders; any bad item refuses
    the submission (JobInputError naming it)."""
    if not files:
        raise JobInputError("no images: upload one labelled .npz (images, labels) or a zip of class folders",
                            code="no_input", status=400)
    if len(files) != 1:
        raise JobInputError(f"{len(files)} files: upload ONE labelled .npz or one zip of class folders",
                            code="too_many_files", status=400)
    name, data = files[0]
    max_bytes = int(settings.jobs_max_upload_mb * 1024 * 1024)
    if len(data) > max_bytes:
        raise JobInputError(f"the upload is {len(data)} bytes, over the limit of {max_bytes}", code="upload_too_large",
                            status=413)
    if not name.lower().endswith((".npz", ".zip")):
        raise JobInputError(f"{name}: a labelled upload is an .npz (images, labels) or a .zip of class folders",
                            code="unsupported_format", status=400)
    limits = dataset_limits(settings)
    limits = DatasetLimits(min(limits.max_items, settings.jobs_max_items), limits.max_bytes, limits.max_side,
                           limits.max_pixels)
    try:
        return read_labelled(data, name=name, shape=tuple(shape), num_classes=num_classes, class_names=class_names,
                             limits=limits)
    except DatasetError as exc:
        raise job_input_error(exc) from exc


def stage_upload(files: list[tuple[str, bytes]], shape: tuple[int, int, int], settings: Settings,
                 limit: int | None = None, num_classes: int | None = None,
                 deadline: float | None = None) -> StagedImages:
    """Decode and validate uploaded files (labels: class indices below `num_classes`); refuse (JobInputError)
    what is wrong as a whole, and stop (SubmissionTimeout) past `deadline`, checked before each file."""
    if not files:
        raise JobInputError("no images: upload files (.npz, .npy, .zip, PNG/JPEG) or name a dataset",
                            code="no_input", status=400)
    max_bytes = int(settings.jobs_max_upload_mb * 1024 * 1024)
    total = sum(len(data) for _, data in files)
    if total > max_bytes:
        raise JobInputError(f"the upload is {total} bytes, over the limit of {max_bytes}", code="upload_too_large",
                            status=413)
    limits = limits_of(settings)
    parts: list[StagedImages] = []
    for name, data in files:
        lower = name.lower()
        if lower.endswith(".zip") or data[:4] == b"PK\x03\x04" and not lower.endswith(".npz"):
            parts.append(_stage_zip(name, data, shape, limits, max_bytes, deadline))
        elif lower.endswith(".npz"):
            check_deadline(deadline)
            parts.append(_stage_npz(name, data, shape, limits, max_bytes))
        else:
            parts.append(_stage_files([(name, data)], shape, limits, deadline))
        count = sum(len(p.names) for p in parts)
        if count > settings.jobs_max_items:
            raise JobInputError(f"the upload holds more than {settings.jobs_max_items} images", code="too_many_items",
                                status=413)
    staged = _join(parts, shape)
    if limit is not None:
        staged = _first(staged, limit)
    if not staged.names:
        raise JobInputError("the upload holds no image", code="no_input", status=400)
    if num_classes is not None and staged.labels is not None and len(staged.labels):
        low, high = int(staged.labels.min()), int(staged.labels.max())
        if low < 0 or high >= num_classes:
            raise JobInputError(f"labels must be class indices 0..{num_classes - 1}, got {low if low < 0 else high}",
                                code="invalid_labels")
    if staged.images.shape[0] == 0:
        reasons = "; ".join(f"{e.name}: {e.reason}" for e in staged.errors[:5])
        raise JobInputError(f"no valid image in the upload ({reasons})", code="invalid_images",
                            extra={"item_errors": [e.model_dump() for e in staged.errors]})
    return staged


def _join(parts: list[StagedImages], shape: tuple[int, int, int]) -> StagedImages:
    """Concatenate parts; item indexes run over the whole upload, valid or not."""
    images, labels, names, errors = [], [], [], []
    offset = 0
    with_labels = all(p.labels is not None for p in parts) and bool(parts)
    for p in parts:
        images.append(p.images)
        if with_labels:
            labels.append(p.labels)
        names += p.names
        errors += [ItemError(index=e.index + offset, name=e.name, reason=e.reason) for e in p.errors]
        offset += len(p.names)
    stacked = np.concatenate(images) if images else np.zeros((0, *shape), np.float32)
    return StagedImages(stacked, np.concatenate(labels) if with_labels else None, names, errors)


def _first(staged: StagedImages, limit: int) -> StagedImages:
    """Only the first `limit` items (valid or not)."""
    bad = {e.index for e in staged.errors}
    keep_valid = sum(1 for i in range(min(limit, len(staged.names))) if i not in bad)
    labels = None if staged.labels is None else staged.labels[:keep_valid]
    return StagedImages(staged.images[:keep_valid], labels, staged.names[:limit],
                        [e for e in staged.errors if e.index < limit])


def valid_names(staged_names: list[str], errors: list[ItemError]) -> list[str]:
    """Names of the valid items, in order (the rows of the image array)."""
    bad = {e.index for e in errors}
    return [n for i, n in enumerate(staged_names) if i not in bad]


def _stage_files(files: list[tuple[str, bytes | str]], shape: tuple[int, int, int], limits: InputLimits,
                 deadline: float | None) -> StagedImages:
    """Image files (PNG/JPEG/.npy of one image each), each decoded on its own (an image of another size is
    refused from its header); failures become item errors (a str in place of the bytes is a failure already
    known)."""
    images, names, errors = [], [], []
    for i, (name, data) in enumerate(files):
        check_deadline(deadline)
        names.append(name)
        if isinstance(data, str):
            errors.append(ItemError(index=i, name=name, reason=data))
            continue
        try:
            batch = decode_image(data, shape, limits).images.numpy()
        except ImageInputError as exc:
            errors.append(ItemError(index=i, name=name, reason=f"{exc.code}: {exc.message}"))
            continue
        if batch.shape[0] != 1:
            errors.append(ItemError(index=i, name=name, reason="a file must hold one image; use .npz for batches"))
            continue
        images.append(batch)
    stacked = np.concatenate(images) if images else np.zeros((0, *shape), np.float32)
    return StagedImages(stacked, None, names, errors)


def _stage_zip(archive: str, data: bytes, shape: tuple[int, int, int], limits: InputLimits,
               max_bytes: int, deadline: float | None) -> StagedImages:
    """A zip of PNG/JPEG (or one-image .npy) files, in name order; unsafe or oversized archives are refused."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise JobInputError(f"{archive} is not a readable zip archive: {exc}", code="corrupt_archive",
                            status=400) from exc
    members = []
    for info in infos:
        if not safe_member(info.filename) or is_symlink(info):
            raise JobInputError(f"{archive}: member {info.filename!r} escapes the archive (absolute path, '..' or "
                                "symlink)", code="unsafe_archive", status=400)
        if info.is_dir() or any(part in info.filename for part in SKIPPED_MEMBERS):
            continue
        members.append(info)
    if len(members) > limits.max_batch:
        raise JobInputError(f"{archive} holds {len(members)} files, over the limit of {limits.max_batch}",
                            code="too_many_items", status=413)
    declared = sum(info.file_size for info in members)
    if declared > max_bytes:
        raise JobInputError(f"{archive} unpacks to {declared} bytes, over the limit of {max_bytes}",
                            code="upload_too_large", status=413)
    files: list[tuple[str, bytes | str]] = []
    for info in sorted(members, key=lambda m: m.filename):
        try:
            files.append((info.filename, zf.read(info)))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:  # CRC, truncated
            files.append((info.filename, f"corrupt_member: cannot be unpacked: {exc}"))
    staged = _stage_files(files, shape, limits, deadline)
    staged.names = [f"{archive}/{n}" for n in staged.names]
    for e in staged.errors:
        e.name = f"{archive}/{e.name}"
    return staged


def _stage_npz(name: str, data: bytes, shape: tuple[int, int, int], limits: InputLimits,
               max_bytes: int) -> StagedImages:
    """An .npz with an image array ('images' or 'x', or its only array) and optional 'labels' / 'y'; the
    members' declared sizes are checked before any is unpacked (service.data.arrays)."""
    try:
        arrays = read_npz(data, max_values(shape, limits, resize=False) + limits.max_batch, max_bytes, name)
    except ArrayFileError as exc:
        if exc.code == "array_too_large":
            raise JobInputError(exc.message, code="upload_too_large", status=413) from exc
        raise JobInputError(f"{exc.message} (corrupt, or not numbers)", code="corrupt_archive", status=400) from exc
    key = next((k for k in IMAGE_KEYS if k in arrays), None) or (next(iter(arrays)) if len(arrays) == 1 else None)
    if key is None:
        raise JobInputError(f"{name}: no image array (name it one of {', '.join(IMAGE_KEYS)})", code="invalid_archive")
    array = arrays[key]
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    labels = arrays[label_key] if label_key else None
    try:
        batch = tensor_batch(array, shape, limits).images.numpy()
        errors: list[ItemError] = []
        rows = list(range(batch.shape[0]))
    except ImageInputError as exc:
        if exc.code not in ("non_finite", "out_of_range") or array.ndim < 3:
            raise JobInputError(f"{name}: {exc.message}", code=exc.code) from exc
        batch, errors, rows = _per_row(name, array, shape, limits)
    count = array.shape[0] if errors else batch.shape[0]
    names = [f"{name}[{i}]" for i in range(count)]
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != len(names) or labels.dtype.kind not in "iu":
            raise JobInputError(f"{name}: labels must be {len(names)} integers", code="invalid_labels")
        labels = labels[rows].astype(np.int64)
    return StagedImages(batch, labels, names, errors)


def _per_row(name: str, array: np.ndarray, shape: tuple[int, int, int],
             limits: InputLimits) -> tuple[np.ndarray, list[ItemError], list[int]]:
    """Validate image by image, so that one bad image does not sink the others."""
    good, errors, rows = [], [], []
    for i in range(array.shape[0]):
        try:
            good.append(tensor_batch(array[i:i + 1], shape, limits).images.numpy())
            rows.append(i)
        except ImageInputError as exc:
            errors.append(ItemError(index=i, name=f"{name}[{i}]", reason=f"{exc.code}: {exc.message}"))
    stacked = np.concatenate(good) if good else np.zeros((0, *shape), np.float32)
    return stacked, errors, rows


def pack(images: np.ndarray, labels: np.ndarray | None) -> bytes:
    """Images (and labels) as compressed .npz bytes, how uploads are stored for the workers."""
    buffer = io.BytesIO()
    arrays = {"images": images.astype(np.float32)}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def unpack(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return npz["images"], (npz["labels"] if "labels" in npz.files else None)
