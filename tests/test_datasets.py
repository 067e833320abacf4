"""Labelled datasets a user brings (service/data/datasets.py) on real data (sklearn's digits, the bundled MNIST):
each format written with service/data/sources.py reads back equal; every bad input is refused with its code and
the failing item named; split, named datasets, `export-dataset` and the job-side entry points."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import zip_of

from service.cli import main
from service.config import Settings
from service.data import sources
from service.data.datasets import (
    DatasetError,
    DatasetLimits,
    LabelledImages,
    load_dataset_by_name,
    load_named,
    named_datasets,
    read_labelled,
    split,
)
from service.jobs import inputs
from service.jobs.types import JobInputError

# sklearn's load_digits: images per digit 0..9 (its documentation: 1797 images, about 180 per class)
DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
PNG_STEP = 0.5 / 255 + 1e-6  # 8-bit PNG rounds each value to the nearest k / 255


@pytest.fixture(scope="module")
def digits() -> LabelledImages:
    return sources.sklearn_digits()


@pytest.fixture(scope="module")
def mnist_val() -> LabelledImages:
    return sources.mnist("val")


def by_index(read: LabelledImages) -> np.ndarray:
    """Source indices of items written by write_image_folder / write_zip (`<class>/<index>.png`)."""
    return np.asarray([int(Path(n).stem) for n in read.names])


def refused(code: str, *names: str, **kwargs) -> DatasetError:
    """The DatasetError of read_labelled(**kwargs); its code must be `code` and its message name each of `names`."""
    kwargs.setdefault("num_classes", None)
    kwargs.setdefault("shape", None)
    with pytest.raises(DatasetError) as info:
        read_labelled(**kwargs)
    assert info.value.code == code, info.value.message
    for name in names:
        assert name in info.value.message, info.value.message
    return info.value


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def digit_members(digits: LabelledImages, count: int = 30) -> dict[str, bytes]:
    """The first `count` digits as zip members `<label>/<index>.png`."""
    return {f"{digits.labels[i]}/{i:04d}.png": sources.png_bytes(digits.images[i]) for i in range(count)}


# ------------------------------------------------------------------------------------------------ the real data

def test_sources_are_the_real_data(digits: LabelledImages, mnist_val: LabelledImages) -> None:
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == np.float32
    assert np.bincount(digits.labels).tolist() == DIGIT_COUNTS
    assert digits.images.max() == 1.0 and np.allclose(digits.images * 16, np.round(digits.images * 16))
    assert digits.describe()["per_class"] == {str(d): n for d, n in enumerate(DIGIT_COUNTS)}
    assert mnist_val.images.shape == (1000, 1, 28, 28) and np.bincount(mnist_val.labels).tolist() == [100] * 10
    assert len(sources.mnist("all")) == 5000


def test_rgb_digits_are_colourised_digits(digits: LabelledImages) -> None:
    rgb = sources.rgb_digits(size=16, seed=1)
    assert rgb.images.shape == (1797, 3, 16, 16) and np.array_equal(rgb.labels, digits.labels)
    assert 0 <= rgb.images.min() and rgb.images.max() <= 1
    for image, digit in zip(rgb.images[::40], digits.images[::40, 0], strict=True):
        colours = image.reshape(3, -1)
        centred = colours - colours.mean(axis=1, keepdims=True)
        singular = np.linalg.svd(centred, compute_uv=False)
        assert singular[1] < 1e-4 * singular[0]  # every pixel on one line in RGB: background to ink colour
        along = (np.linalg.svd(centred)[0][:, 0] @ centred).reshape(16, 16)
        pooled = along.reshape(8, 2, 8, 2).mean(axis=(1, 3))  # back to 8x8: the digit itself, up to sign and scale
        assert abs(np.corrcoef(pooled.ravel(), digit.ravel())[0, 1]) > 0.95
        ends = colours[:, [np.argmin(along), np.argmax(along)]]
        assert np.linalg.norm(ends[:, 1] - ends[:, 0]) > 0.3  # foreground and background colours apart
    assert rgb.images.mean(axis=(2, 3)).std(axis=0).min() > 0.1  # a colour per image, in every channel
    assert np.array_equal(sources.rgb_digits(size=16, seed=1).images, rgb.images)
    assert not np.allclose(sources.rgb_digits(size=16, seed=2).images, rgb.images)


# -------------------------------------------------------------------------------------------- formats read back

@pytest.mark.parametrize("fmt", ["npz", "folder", "zip", "zip-top"])
def test_each_format_reads_back_the_digits(digits: LabelledImages, tmp_path: Path, fmt: str) -> None:
    if fmt == "npz":
        path = sources.write_npz(digits, tmp_path / "digits.npz")
    elif fmt == "folder":
        path = sources.write_image_folder(digits, tmp_path / "digits")
    else:
        path = sources.write_zip(digits, tmp_path / "digits.zip", top="digits" if fmt == "zip-top" else None)
    read = read_labelled(path, name=path.name, shape=(1, 8, 8), num_classes=10)
    assert read.images.shape == digits.images.shape and read.images.dtype == np.float32
    assert read.class_names == [str(d) for d in range(10)]
    if fmt == "npz":
        assert np.array_equal(read.images, digits.images) and np.array_equal(read.labels, digits.labels)
        assert read.names[17] == "digits.npz[17]"
    else:
        idx = by_index(read)
        assert sorted(idx.tolist()) == list(range(len(digits)))
        assert np.abs(read.images - digits.images[idx]).max() <= PNG_STEP
        assert np.array_equal(read.labels, digits.labels[idx])
        assert read.names[0].count("/") == 1  # "<class>/<index>.png", no top folder
    assert read.describe()["per_class"] == {str(d): n for d, n in enumerate(DIGIT_COUNTS)}
    assert str(len(digits)) in read.source


@pytest.mark.parametrize("fmt", ["npz", "zip"])
def test_mnist_reads_back_exactly(mnist_val: LabelledImages, tmp_path: Path, fmt: str) -> None:
    writer = sources.write_npz if fmt == "npz" else sources.write_zip
    path = writer(mnist_val, tmp_path / f"val.{fmt}")
    read = read_labelled(path.read_bytes(), name=path.name, shape=(1, 28, 28), num_classes=10)
    idx = np.arange(len(mnist_val)) if fmt == "npz" else by_index(read)
    assert np.array_equal(read.images, mnist_val.images[idx])  # MNIST is 8-bit: PNG is exact
    assert np.array_equal(read.labels, mnist_val.labels[idx])


def test_shape_and_classes_are_inferred(digits: LabelledImages, tmp_path: Path) -> None:
    rgb = sources.rgb_digits(size=12).subset(range(200))
    zipped = read_labelled(sources.write_zip(rgb, tmp_path / "rgb.zip"), name="rgb", shape=None, num_classes=None)
    assert zipped.images.shape == (200, 3, 12, 12) and zipped.class_names == [str(d) for d in range(10)]
    assert np.abs(zipped.images - rgb.images[by_index(zipped)]).max() <= PNG_STEP
    photo = io.BytesIO()
    Image.fromarray((rgb.images[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(photo, format="JPEG")
    grey = sources.png_bytes(rgb.images[1, :1])
    mixed = read_labelled(zip_of({"cat/a.jpg": photo.getvalue(), "dog/b.png": grey}), name="m.zip", shape=None,
                          num_classes=None)  # the first image (a colour JPEG) sets the shape; the grey PNG -> RGB
    assert mixed.images.shape == (2, 3, 12, 12) and mixed.labels.tolist() == [0, 1] and mixed.names[0] == "cat/a.jpg"
    assert np.abs(mixed.images[0] - rgb.images[0]).mean() < 0.05
    assert np.array_equal(mixed.images[1, 0], mixed.images[1, 2])
    plain = digits.subset(range(100))
    arrays = npz_bytes(x=(plain.images[:, 0] * 255).round().astype(np.uint8), y=plain.labels)
    read = read_labelled(arrays, name="u8.npz", shape=None, num_classes=None)
    assert read.images.shape == (100, 1, 8, 8) and read.class_names is None
    assert np.abs(read.images - plain.images).max() <= PNG_STEP  # uint8 divided by 255


def test_channels_last_arrays_are_accepted(tmp_path: Path) -> None:
    rgb = sources.rgb_digits(size=8).subset(range(50))
    data = npz_bytes(images=rgb.images.transpose(0, 2, 3, 1), labels=rgb.labels)
    read = read_labelled(data, name="nhwc.npz", shape=(3, 8, 8), num_classes=10)
    assert np.array_equal(read.images, rgb.images)


def test_folders_map_to_labels_by_name_number_or_order(digits: LabelledImages, tmp_path: Path) -> None:
    animals = LabelledImages(digits.images[:30], digits.labels[:30] % 3, digits.names[:30], "t", ["dog", "cat", "owl"])
    folder = sources.write_image_folder(animals, tmp_path / "animals")
    by_name = read_labelled(folder, name="a", shape=(1, 8, 8), num_classes=3, class_names=["dog", "cat", "owl"])
    assert np.array_equal(by_name.labels, animals.labels[by_index(by_name)])
    by_order = read_labelled(folder, name="a", shape=(1, 8, 8), num_classes=3)  # sorted: cat 0, dog 1, owl 2
    assert by_order.class_names == ["cat", "dog", "owl"]
    assert np.array_equal(by_order.labels, np.array([1, 0, 2])[animals.labels[by_index(by_order)]])
    some = digits.subset(np.flatnonzero(np.isin(digits.labels, [2, 7]))[:40])  # folders "2" and "7" only
    numbered = read_labelled(sources.write_zip(some, tmp_path / "27.zip"), name="27", shape=(1, 8, 8), num_classes=10)
    assert sorted(set(numbered.labels.tolist())) == [2, 7]


def test_limit_takes_a_prefix_that_samples_every_class(digits: LabelledImages, tmp_path: Path) -> None:
    path = sources.write_zip(digits, tmp_path / "digits.zip")
    read = read_labelled(path, name="d", shape=(1, 8, 8), num_classes=10, limit=50)
    assert len(read) == 50 and np.bincount(read.labels, minlength=10).min() >= 4


def test_resize_is_asked_for(digits: LabelledImages, tmp_path: Path) -> None:
    path = sources.write_zip(digits.subset(range(20)), tmp_path / "d.zip")
    refused("wrong_shape", "d.zip", "0/00.png", source=path, name="d.zip", shape=(1, 16, 16), num_classes=10)
    read = read_labelled(path, name="d.zip", shape=(1, 16, 16), num_classes=10, resize=True)
    assert read.images.shape == (20, 1, 16, 16)


# -------------------------------------------------------------------------------------------- strict refusals

def test_npz_refusals_name_the_item(digits: LabelledImages) -> None:
    images, labels = digits.images[:40].copy(), digits.labels[:40].copy()
    data = npz_bytes(images=images, labels=labels)
    refused("wrong_shape", "d.npz", source=data, name="d.npz", shape=(1, 28, 28))
    refused("wrong_channels", "d.npz", source=data, name="d.npz", shape=(3, 8, 8))
    refused("wrong_shape", "d.npz", source=npz_bytes(images=images[:, 0, 0], labels=labels), name="d.npz")
    high = images.copy()
    high[17, 0, 3, 3] = 1.5
    refused("out_of_range", "d.npz[17]", "1.5", source=npz_bytes(images=high, labels=labels), name="d.npz")
    nan = images.copy()
    nan[5, 0, 0, 0] = np.nan
    refused("out_of_range", "d.npz[5]", source=npz_bytes(images=nan, labels=labels), name="d.npz")
    wide = labels.copy()
    wide[3] = 10
    refused("bad_label", "d.npz[3]", source=npz_bytes(images=images, labels=wide), name="d.npz", num_classes=10)
    wide[3] = -1
    refused("bad_label", "d.npz[3]", source=npz_bytes(images=images, labels=wide), name="d.npz")
    refused("bad_label", "d.npz", "float", source=npz_bytes(images=images, labels=labels.astype(float)),
            name="d.npz")
    refused("bad_label", "d.npz", source=npz_bytes(images=images, labels=labels[:39]), name="d.npz")
    refused("missing_labels", "d.npz", source=npz_bytes(images=images), name="d.npz")
    refused("bad_dtype", "d.npz", source=npz_bytes(images=(images * 255).astype(np.int64), labels=labels),
            name="d.npz")
    refused("empty", "d.npz", source=npz_bytes(images=images[:0], labels=labels[:0]), name="d.npz")
    error = refused("too_many_items", "d.npz", source=data, name="d.npz", limits=DatasetLimits(max_items=39))
    assert error.status == 413


def test_zip_refusals_name_the_member(digits: LabelledImages) -> None:
    members = digit_members(digits)
    good = members["3/0003.png"]
    corrupt = dict(members, **{"3/0003.png": good[: len(good) // 2]})
    refused("unreadable_item", "z.zip", "3/0003.png", source=zip_of(corrupt), name="z.zip", shape=(1, 8, 8))
    text = dict(members, **{"3/0003.png": b"not an image"})
    refused("unreadable_item", "3/0003.png", source=zip_of(text), name="z.zip", shape=(1, 8, 8))
    notes = dict(members, **{"3/notes.txt": b"hello"})
    refused("unreadable_item", "3/notes.txt", source=zip_of(notes), name="z.zip", shape=(1, 8, 8))
    other = dict(members, **{"5/0005.png": sources.png_bytes(np.zeros((1, 9, 8), np.float32))})
    refused("wrong_shape", "5/0005.png", source=zip_of(other), name="z.zip", shape=(1, 8, 8))
    refused("wrong_channels", "z.zip", "0/0000.png", source=zip_of(members), name="z.zip", shape=(2, 8, 8))
    for bad in ("../evil.png", "/abs/0/1.png", "0/..\\x.png"):
        error = refused("unsafe_archive", bad.replace("\\", "\\\\"), source=zip_of({**members, bad: good}),
                        name="z.zip")
        assert error.status == 400
    link = zipfile.ZipInfo("0/link.png")
    link.external_attr = 0o120777 << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    refused("unsafe_archive", "0/link.png", source=buffer.getvalue(), name="z.zip")
    error = refused("too_many_items", "z.zip", source=zip_of(members), name="z.zip",
                    limits=DatasetLimits(max_items=29))
    assert error.status == 413
    refused("bad_layout", "loose.png", source=zip_of({**members, "loose.png": good}), name="z.zip")
    refused("bad_layout", "3/deeper/", source=zip_of({**members, "3/deeper/x.png": good}), name="z.zip")
    refused("empty", "'extra'", source=zip_of({**members, "extra/": b""}), name="z.zip", shape=(1, 8, 8))
    refused("empty", "no class folders", source=zip_of({}), name="z.zip")
    junk = {**members, "__MACOSX/3/._0003.png": b"junk", "3/.DS_Store": b"junk"}
    assert len(read_labelled(zip_of(junk), name="z.zip", shape=(1, 8, 8), num_classes=10)) == 30


def test_a_declared_size_over_the_limit_is_refused_before_unpacking(digits: LabelledImages) -> None:
    data = bytearray(zip_of(digit_members(digits, 3)))
    entry = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 1)  # the second member's central directory entry
    struct.pack_into("<I", data, entry + 24, 3 << 30)  # its uncompressed size: 3 GiB
    error = refused("too_large", "1/0001.png", source=bytes(data), name="bomb.zip", shape=(1, 8, 8))
    assert error.status == 413
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.zeros((1000, 1, 8, 8), np.float32), labels=np.zeros(1000, np.int64))
    data = buffer.getvalue()  # a few KiB that unpack to 264 KB
    refused("too_large", "big.npz", source=data, name="big.npz", limits=DatasetLimits(max_bytes=4 * len(data)))


def test_folder_refusals(digits: LabelledImages, tmp_path: Path) -> None:
    letters = LabelledImages(digits.images[:60], digits.labels[:60], digits.names[:60], "t", list("abcdefghij"))
    folder = sources.write_image_folder(letters, tmp_path / "letters")
    refused("too_many_classes", "10 class folders", "5 classes", source=folder, name="letters", shape=(1, 8, 8),
            num_classes=5)
    numbered = sources.write_image_folder(digits.subset(range(60)), tmp_path / "numbered")
    refused("bad_label", "'5'", source=numbered, name="numbered", shape=(1, 8, 8), num_classes=5)
    (numbered / "extra").mkdir()
    refused("empty", "'extra'", source=numbered, name="numbered", shape=(1, 8, 8))
    (tmp_path / "nothing").mkdir()
    refused("empty", source=tmp_path / "nothing", name="nothing")
    refused("not_found", source=tmp_path / "missing", name="missing")
    (letters_file := folder / "stray.png").write_bytes(b"x")
    refused("bad_layout", "stray.png", source=folder, name="letters", shape=(1, 8, 8))
    letters_file.unlink()
    (folder / "a" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    refused("unreadable_item", "a/0000.png", source=folder, name="letters", shape=(1, 8, 8))


# ------------------------------------------------------------------------------------------------------- split

def test_split_is_stratified_deterministic_and_disjoint(digits: LabelledImages) -> None:
    rest, test = split(digits, 0.25, seed=3)
    assert len(test) == round(0.25 * len(digits)) and len(rest) + len(test) == len(digits)
    assert set(rest.names).isdisjoint(test.names) and set(rest.names) | set(test.names) == set(digits.names)
    expected = 0.25 * np.asarray(DIGIT_COUNTS)
    assert np.abs(np.bincount(test.labels, minlength=10) - expected).max() < 1
    again = split(digits, 0.25, seed=3)[1]
    assert again.names == test.names and np.array_equal(again.images, test.images)
    assert split(digits, 0.25, seed=4)[1].names != test.names
    index = {n: i for i, n in enumerate(digits.names)}
    rows = [index[n] for n in test.names]
    assert np.array_equal(test.images, digits.images[rows]) and np.array_equal(test.labels, digits.labels[rows])
    with pytest.raises(DatasetError) as info:
        split(digits.subset(range(3)), 0.1, seed=0)
    assert info.value.code == "empty"
    with pytest.raises(DatasetError):
        split(digits, 1.0, seed=0)


# --------------------------------------------------------------------------------------------- named datasets

@pytest.fixture()
def data_folder(digits: LabelledImages, tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    sources.write_image_folder(digits.subset(range(40)), root / "digits")
    sources.write_npz(digits.subset(range(40, 90)), root / "small.npz")
    (root / "notes.txt").write_text("not a dataset")
    (tmp_path / "outside.npz").write_bytes(npz_bytes(images=digits.images[:5], labels=digits.labels[:5]))
    return root


def test_named_datasets_resolve(data_folder: Path, digits: LabelledImages) -> None:
    assert named_datasets([data_folder, data_folder / "missing"]) == {"digits": data_folder / "digits",
                                                                     "small": data_folder / "small.npz"}
    small = load_dataset_by_name("data:small", [data_folder], (1, 8, 8), 10, None)
    assert np.array_equal(small.images, digits.images[40:90]) and small.names[0] == "data:small[0]"
    assert str(data_folder) not in small.source  # a server path is not shown to job clients
    folder = load_dataset_by_name("data:digits", [data_folder], (1, 8, 8), 10, None, limit=10)
    assert len(folder) == 10 and np.abs(folder.images - digits.images[by_index(folder)]).max() <= PNG_STEP
    mnist = load_dataset_by_name("mnist:val", [], (1, 28, 28), 10, None, limit=7)
    assert len(mnist) == 7 and np.array_equal(mnist.images, sources.mnist("val").images[:7])
    assert len(load_named("small", [data_folder])) == 50


@pytest.mark.parametrize("name", ["data:../outside", "data:a/b", "data:.hidden", "data:..", "data:", "data:/etc"])
def test_named_datasets_refuse_paths(data_folder: Path, name: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset_by_name(name, [data_folder], None, None, None)
    assert info.value.code == "invalid_name" and info.value.status == 400


def test_unknown_and_unfit_named_datasets(data_folder: Path) -> None:
    for name in ("data:nope", "cifar:test", "mnist:bogus", str(data_folder / "small.npz")):
        with pytest.raises(DatasetError) as info:
            load_dataset_by_name(name, [data_folder], None, None, None)
        assert info.value.code == "unknown_dataset" and "data:small" in info.value.message
    with pytest.raises(DatasetError) as info:
        load_dataset_by_name("mnist:test", [], (3, 32, 32), 10, None)
    assert info.value.code == "wrong_channels" and "mnist:test" in info.value.message
    with pytest.raises(DatasetError) as info:
        load_dataset_by_name("mnist:test", [], (1, 28, 28), 5, None)
    assert info.value.code == "bad_label" and "mnist:test[" in info.value.message


# ------------------------------------------------------------------------------------------------ CLI and jobs

@pytest.mark.parametrize(("dataset", "out", "extra"), [
    ("sklearn-digits", "d.npz", []),
    ("rgb-digits", "rgb.zip", ["--size", "12", "--seed", "5"]),
    ("mnist-val", "val", ["--format", "folder"]),
])
def test_export_dataset_writes_each_format(tmp_path: Path, dataset: str, out: str, extra: list[str],
                                           capsys: pytest.CaptureFixture) -> None:
    assert main(["export-dataset", dataset, "--out", str(tmp_path / out), *extra]) == 0
    assert "wrote" in capsys.readouterr().out
    expected = {"sklearn-digits": sources.sklearn_digits, "mnist-val": lambda: sources.mnist("val"),
                "rgb-digits": lambda: sources.rgb_digits(12, 5)}[dataset]()
    read = read_labelled(tmp_path / out, name=out, shape=None, num_classes=None)
    idx = np.arange(len(expected)) if out.endswith(".npz") else by_index(read)
    assert read.images.shape == expected.images.shape
    assert np.abs(read.images - expected.images[idx]).max() <= PNG_STEP
    assert np.array_equal(read.labels, expected.labels[idx])
    assert main(["export-dataset", "mnist-val", "--out", str(tmp_path / "x.npz"), "--size", "3"]) == 2


def test_jobs_get_job_input_errors(data_folder: Path, digits: LabelledImages) -> None:
    settings = Settings(dataset_folders=[data_folder])
    with pytest.raises(JobInputError) as info:
        inputs.load_dataset("cifar:test", None, settings)
    assert info.value.code == "unknown_dataset" and info.value.status == 422 and "cifar:test" in info.value.detail
    images, labels = inputs.load_dataset("data:small", 20, settings)
    assert np.array_equal(images, digits.images[40:60]) and np.array_equal(labels, digits.labels[40:60])
    with pytest.raises(JobInputError) as info:
        inputs.check_dataset_shape("data:digits", (1, 28, 28), settings)
    assert info.value.code == "wrong_shape"


def test_labelled_uploads_are_staged_strictly(digits: LabelledImages) -> None:
    settings = Settings()
    members = digit_members(digits)
    staged = inputs.stage_labelled_upload([("d.zip", zip_of(members))], (1, 8, 8), 10, None, settings)
    assert len(staged) == 30 and np.array_equal(staged.labels, digits.labels[by_index(staged)])
    broken = dict(members, **{"7/0007.png": b"\x89PNG\r\n\x1a\n broken"})
    with pytest.raises(JobInputError) as info:
        inputs.stage_labelled_upload([("d.zip", zip_of(broken))], (1, 8, 8), 10, None, settings)
    assert info.value.code == "unreadable_item" and "7/0007.png" in info.value.detail
    with pytest.raises(JobInputError) as info:
        inputs.stage_labelled_upload([("d.npz", npz_bytes(images=digits.images[:9]))], (1, 8, 8), 10, None,
                                     settings)
    assert info.value.code == "missing_labels"
    for files in ([], [("a.npz", b""), ("b.npz", b"")], [("a.png", members["0/0000.png"])]):
        with pytest.raises(JobInputError) as info:
            inputs.stage_labelled_upload(files, (1, 8, 8), 10, None, settings)
        assert info.value.status == 400
    small = Settings(jobs_max_items=10)
    with pytest.raises(JobInputError) as info:
        inputs.stage_labelled_upload([("d.zip", zip_of(members))], (1, 8, 8), 10, None, small)
    assert info.value.code == "too_many_items" and info.value.status == 413
