"""MNIST-style data sets as tensors: two embedded subsets, or torchvision's MNIST / Fashion-MNIST.

* ``mnist-5k``: 5,000 real MNIST training digits (500 per class, stored sorted by class —
  shuffle!) and the full real 10,000-digit test set, shipped with the project as idx gzip
  files in ``train/data/mnist-5k/`` and parsed here directly (no network).
* ``fashion-5k``: real Fashion-MNIST, the first 500 images of each class of the official
  training split and the first 200 of each class of the official test split (5,000 + 2,000,
  in their original order), shipped the same way in ``train/data/fashion-5k/``.
* ``mnist`` / ``fashion-mnist``: the full ``torchvision.datasets.MNIST`` / ``FashionMNIST``.
  Without a data root they are downloaded (``download=True``) into ``runs/data/<name>``
  inside the repository (ignored by git); with ``root`` the files must already be there
  (read offline), unless ``download=True`` asks torchvision to fetch them into ``root``.  A
  failed download removes the folders it created.

A root may be the torchvision root itself (``<root>/MNIST/raw/...``) or a folder holding one
sub-folder per data set (``<root>/mnist-5k/MNIST/raw/...``, ``<root>/fashion-mnist/...``).
A missing or corrupt file raises :class:`DataError` naming it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DataError", "Split", "MNISTData", "DeviceData", "load", "on_device", "read_idx_gz", "EMBEDDED", "DOWNLOADS",
           "DATASETS", "EMBEDDED_SETS"]

EMBEDDED_SETS = {name: Path(__file__).resolve().parent / "data" / name for name in ("mnist-5k", "fashion-5k")}
EMBEDDED = EMBEDDED_SETS["mnist-5k"]
DOWNLOADS = Path(__file__).resolve().parents[1] / "runs" / "data"  # the repository's runs/ (git-ignored)
DATASETS = ("mnist-5k", "fashion-5k", "mnist", "fashion-mnist")
_TORCHVISION = {"mnist": "MNIST", "mnist-5k": "MNIST", "fashion-mnist": "FashionMNIST", "fashion-5k": "FashionMNIST"}
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MAGIC_LABELS, _MAGIC_IMAGES = 0x00000801, 0x00000803


class DataError(RuntimeError):
    """A data file is missing, unreadable or not what it should be."""


@dataclass(frozen=True)
class Split:
    """``images``: float32 (N, 1, 28, 28) in [0, 1]; ``labels``: int64 (N,) in 0..9."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MNISTData:
    name: str
    train: Split
    test: Split
    source: str


def read_idx_gz(path: str | os.PathLike) -> Tensor:
    """Read one gzip'd idx file (magic 0x801 labels or 0x803 images) as a uint8 tensor.

    Checks the magic number and that the payload has exactly the size the header states.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"corrupt data file {path}: not a valid gzip file ({err})") from err
    if len(raw) < 8:
        raise DataError(f"corrupt data file {path}: {len(raw)} bytes, too short for an idx header")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic not in (_MAGIC_LABELS, _MAGIC_IMAGES):
        raise DataError(f"corrupt data file {path}: magic number {magic:#010x}, expected 0x00000801 or 0x00000803")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"corrupt data file {path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(raw) != header + count:
        raise DataError(
            f"corrupt data file {path}: header says shape {tuple(shape)} ({header + count} bytes), "
            f"file has {len(raw)} bytes"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape).clone()


def _split(images: Tensor, labels: Tensor, where: str) -> Split:
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{where}: images have shape {tuple(images.shape)}, expected (N, 28, 28)")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: labels outside 0..9")
    return Split(images.to(torch.float32).div_(255.0).unsqueeze(1), labels)


def _load_gz_folder(folder: Path) -> tuple[Split, Split]:
    splits = []
    for split in ("train", "test"):
        image_file, label_file = (folder / name for name in _FILES[split])
        images, labels = read_idx_gz(image_file), read_idx_gz(label_file)
        splits.append(_split(images, labels, f"{image_file} / {label_file}"))
    return splits[0], splits[1]


def _resolve_root(root: Path, name: str, cls_name: str) -> Path:
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    for candidate in (root, root / name):
        if (candidate / cls_name / "raw").is_dir():
            return candidate
    raise DataError(
        f"no {name} data under {root}: expected {root / cls_name / 'raw'} or "
        f"{root / name / cls_name / 'raw'} (torchvision layout, read with download=False)"
    )


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if ``path`` exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _load_torchvision(name: str, root: Path | None, download: bool) -> tuple[Split, Split, str]:
    from torchvision import datasets  # imported lazily: the embedded sets do not need it

    cls = datasets.FashionMNIST if _TORCHVISION[name] == "FashionMNIST" else datasets.MNIST
    download = download or root is None
    if root is None:
        base = DOWNLOADS / name
    elif download:
        base = root
    else:
        base = _resolve_root(root, name, cls.__name__)
    created = _first_missing(base / cls.__name__ / "raw") if download else None
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(base), train=train, download=download)
        except Exception as err:  # torchvision raises RuntimeError / OSError / AssertionError
            if created is not None and created.exists():
                shutil.rmtree(created)  # a failed download leaves no (empty or partial) folders behind
            how = "could not be downloaded" if download else "could not be read (download=False)"
            split = "train" if train else "test"
            raise DataError(f"{name} {split} split under {base / cls.__name__ / 'raw'} {how}: "
                            f"{' '.join(str(err).split())[:300] or type(err).__name__} "
                            f"(the embedded {' and '.join(EMBEDDED_SETS)} need no download)") from err
        splits.append(_split(ds.data, ds.targets, f"{base / cls.__name__ / 'raw'}"))
    return splits[0], splits[1], str(base)


def load(name: str = "mnist-5k", root: str | os.PathLike | None = None, download: bool = False) -> MNISTData:
    """Load ``name`` (one of :data:`DATASETS`) as tensors.

    An embedded set without ``root`` reads the shipped gzip files; with ``root`` it reads the
    torchvision layout under it (``download=False``), like ``mnist`` and ``fashion-mnist``.
    The full sets without ``root`` are downloaded into :data:`DOWNLOADS`; ``download=True``
    downloads them into ``root``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    root_path = None if root is None else Path(root).expanduser()
    if name in EMBEDDED_SETS and root_path is None:
        train, test = _load_gz_folder(EMBEDDED_SETS[name])
        return MNISTData(name, train, test, str(EMBEDDED_SETS[name]))
    if name in EMBEDDED_SETS and download:
        raise ValueError(f"{name} is a subset shipped with the project: nothing to download")
    train, test, source = _load_torchvision(name, root_path, download)
    return MNISTData(name, train, test, source)


@dataclass(frozen=True)
class DeviceData:
    """A data set on the training device: raw training images (to be augmented, then
    normalised, per batch), normalised test images, and the training set's pixel ``mean`` and
    ``std`` used for both."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mean: Tensor
    std: Tensor


def on_device(data: MNISTData, device: torch.device, dtype: torch.dtype, test_limit: int = 0) -> DeviceData:
    """``data`` moved to ``device`` as ``dtype``; only the first ``test_limit`` test images (0: all)."""
    train_x, train_y = data.train.images.to(device, dtype), data.train.labels.to(device)
    mean, std = train_x.mean(), train_x.std()
    test_x = (data.test.images[: test_limit or None].to(device, dtype) - mean) / std
    return DeviceData(data.name, train_x, train_y, test_x, data.test.labels[: test_limit or None].to(device), mean, std)
