"""Convert generated-image .npz files (DM-Improves-AT format) into memory-mappable .npy files.

    python -m data.prepare_generated 50m_part1.npz 50m_part2.npz ... --out DIR --num-classes 100

Input: .npz archives with `image` uint8 N×32×32×3 (HWC, RGB) and `label` integer N (20M and 50M
sets come in parts). Output in DIR: `images.npy` (uint8 N×32×32×3, the parts concatenated in the
order given), `labels.npy` (int64 N) and `meta.json` (count, classes, per-class counts, sources);
`data.generated.path=DIR` then mixes them into training.

Streaming: the arrays are read from inside the zip archives in chunks and appended to the outputs,
so memory stays at one chunk whatever the set size. All inputs are checked (keys, shapes, dtypes,
sizes against the archive's directory) before anything is written; labels are range-checked as
they stream. The outputs are built as `*.partial` files with a progress record, so an interrupted
run continues where it stopped when started again with the same inputs; `meta.json` is written
last, so a directory with `meta.json` is complete. A corrupt input found while streaming, or a
failed write (full disk, unwritable --out), removes the partial files and the directories this run
created (never anything that was there before) and is reported as one line.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import USER_ERRORS, DataError, report

from .generated import IMAGE_BYTES, IMAGE_SHAPE

PROGRESS = ".prepare_progress.json"
OUTPUTS = ("images.npy", "labels.npy")



@dataclass
class Part:
    path: Path
    n: int
    label_dtype: np.dtype

    def fingerprint(self) -> dict:
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "n": self.n}


def _member(archive: zipfile.ZipFile, key: str, path: Path) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(f"{key}.npy")
    except KeyError:
        keys = ", ".join(n.removesuffix(".npy") for n in archive.namelist())
        raise DataError(f"{path}: no '{key}' array (has: {keys})") from None


def _open_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path):
    """Open one .npy member, parse its header; returns (stream, shape, dtype, header bytes)."""
    stream = archive.open(info)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise DataError(f"{path}: {info.filename} has .npy format {version}, "
                               f"expected 1.0 or 2.0")
    except DataError:
        stream.close()
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        stream.close()
        raise DataError(f"{path}: {info.filename} is not a readable .npy array ({err})") \
            from None
    if fortran:
        stream.close()
        raise DataError(f"{path}: {info.filename} is Fortran-ordered; expected C order")
    return stream, shape, dtype, stream.tell()


def inspect(path: Path) -> Part:
    """Check one archive without reading its data: keys, shapes, dtypes and member sizes."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        # A truncated archive loses its central directory (at the end of the file) and lands here.
        raise DataError(f"{path}: not a readable .npz archive (truncated or corrupt: {err})") \
            from None
    with archive:
        size = path.stat().st_size
        shapes = {}
        for key in ("image", "label"):
            info = _member(archive, key, path)
            if info.header_offset + info.compress_size > size:
                raise DataError(f"{path}: truncated ({key} data runs past the end of the file)")
            stream, shape, dtype, header = _open_array(archive, info, path)
            stream.close()
            expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if info.file_size != expected:
                raise DataError(f"{path}: {key} holds {info.file_size - header} data bytes, "
                                   f"its header promises {expected - header} (truncated)")
            shapes[key] = (shape, dtype)
    (ishape, idtype), (lshape, ldtype) = shapes["image"], shapes["label"]
    if len(ishape) != 4 or tuple(ishape[1:]) != IMAGE_SHAPE or idtype != np.uint8:
        raise DataError(f"{path}: image is {idtype} {ishape}, expected uint8 (N, 32, 32, 3)")
    if len(lshape) != 1 or ldtype.kind not in "iu":
        raise DataError(f"{path}: label is {ldtype} {lshape}, expected an integer vector")
    if lshape[0] != ishape[0]:
        raise DataError(f"{path}: {ishape[0]} images but {lshape[0]} labels")
    if ishape[0] == 0:
        raise DataError(f"{path}: holds no images")
    return Part(path, int(ishape[0]), ldtype)


def _read_exact(stream, nbytes: int, path: Path, key: str) -> bytes:
    data = stream.read(nbytes)
    if len(data) != nbytes:
        raise DataError(f"{path}: {key} ends early (truncated)")
    return data


def _npy_header(shape: tuple, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape})
    return buf.getvalue()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable ({err}); remove it or choose another --out") \
            from None


def _missing_dirs(out: Path) -> list[Path]:
    """`out` and those of its ancestors that do not exist yet, deepest first: what mkdir(parents)
    will create, and so what a failed run may remove again."""
    missing = []
    for d in (out, *out.parents):
        if d.exists():
            break
        missing.append(d)
    return missing


def _write_error(out: Path, err: OSError) -> DataError:
    why = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why += "; free space or choose another --out"
    return DataError(f"cannot write to --out {out} ({why})")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(inputs: list[str | Path], out: str | Path, num_classes: int,
            chunk: int = 1 << 16, log=print) -> dict:
    """Convert `inputs` into `out` (see the module docstring); returns the meta record."""
    if num_classes < 1:
        raise DataError(f"--num-classes must be >= 1, got {num_classes}")
    if chunk < 1:
        raise DataError(f"--chunk must be >= 1, got {chunk}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory; choose another --out")
    parts = [inspect(Path(p)) for p in inputs]
    if not parts:
        raise DataError("no input files")
    sources = [p.fingerprint() for p in parts]
    total = sum(p.n for p in parts)
    if (out / "meta.json").exists():
        meta = _read_json(out / "meta.json")
        if meta.get("sources") == sources and meta.get("num_classes") == num_classes:
            log(f"{out} already holds these {total} images; nothing to do")
            return meta
        raise DataError(f"{out} already holds a prepared set from other inputs; "
                           f"choose another --out")
    partial = {name: out / f"{name}.partial" for name in OUTPUTS}
    progress_path = out / PROGRESS
    job = {"sources": sources, "num_classes": num_classes, "n": total}
    done, counts = 0, np.zeros(num_classes, dtype=np.int64)
    # Decided before anything is written: files of another preparation are never touched.
    if progress_path.exists():
        saved = _read_json(progress_path)
        if {k: saved.get(k) for k in job} == job and all(p.exists() for p in partial.values()):
            done, counts = saved["done"], np.asarray(saved["class_counts"], dtype=np.int64)
            log(f"resuming: {done} of {total} images already converted")
        else:
            log("the inputs differ from the interrupted preparation's: starting over")
    elif any(p.exists() for p in partial.values()) or any((out / n).exists() for n in OUTPUTS):
        raise DataError(f"{out} holds files of another preparation; choose another --out")
    created = _missing_dirs(out)
    made = [out / n for n in OUTPUTS if not (out / n).exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _prepare_into(parts, out, num_classes, chunk, log, job, done, counts, partial,
                             progress_path)
    except (DataError, OSError) as err:
        # A corrupt input or a failed write (full disk, read-only place): no half-made set and no
        # empty directory stays behind. An interruption (Ctrl-C, a kill) keeps the partial files so
        # that the next run continues. Only what this run created is removed: the partial files
        # (a run that resumed them has just found them unusable), outputs it renamed into place
        # before meta.json failed, and the new directories.
        for p in (*partial.values(), progress_path, *made,
                  *(out / f"{n}.tmp" for n in (PROGRESS, "meta.json"))):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        for d in created:
            try:
                d.rmdir()  # only when empty: never anything another process put there
            except OSError:
                break
        if isinstance(err, DataError):
            raise
        raise _write_error(out, err) from None


def _prepare_into(parts: list[Part], out: Path, num_classes: int, chunk: int, log, job: dict,
                  done: int, counts: np.ndarray, partial: dict[str, Path], progress_path: Path
                  ) -> dict:
    """Stream `parts` into `out` from image `done` on (the files of `partial`), then put the
    outputs and meta.json in place; returns the meta record."""
    total, sources = job["n"], job["sources"]
    headers = {"images.npy": _npy_header((total, *IMAGE_SHAPE), np.uint8),
               "labels.npy": _npy_header((total,), np.int64)}
    itemsize = {"images.npy": IMAGE_BYTES, "labels.npy": 8}
    files = {}
    try:
        for name in OUTPUTS:
            mode = "r+b" if done else "wb"
            f = files[name] = open(partial[name], mode)
            f.write(headers[name])
            # Anything past the last recorded chunk may be half written: cut it off.
            f.seek(len(headers[name]) + done * itemsize[name])
            f.truncate()
        start = 0
        for part in parts:
            if start + part.n <= done:
                start += part.n
                continue
            done, counts = _convert_part(part, start, done, files, counts, chunk, num_classes,
                                         progress_path, job, log)
            start += part.n
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            try:
                f.close()
            except OSError:  # a failed flush of an already failing run: the first error counts
                pass
    for name in OUTPUTS:
        os.replace(partial[name], out / name)
    meta = {"n": total, "num_classes": num_classes, "image_shape": list(IMAGE_SHAPE),
            "class_counts": counts.tolist(), "sources": sources}
    _write_json(out / "meta.json", meta)
    progress_path.unlink(missing_ok=True)
    log(f"wrote {total} images in {num_classes} classes to {out}")
    return meta


def _convert_part(part: Part, start: int, done: int, files: dict, counts: np.ndarray,
                  chunk: int, num_classes: int, progress_path: Path, job: dict, log):
    """Stream one archive's rows [done - start, n) into the open output files."""
    skip = done - start
    reading = True  # an OSError while reading the archive is a corrupt input; while writing, not
    with zipfile.ZipFile(part.path) as archive:
        img, _, _, _ = _open_array(archive, archive.getinfo("image.npy"), part.path)
        lab, _, _, _ = _open_array(archive, archive.getinfo("label.npy"), part.path)
        try:
            with img, lab:
                if skip:  # resumed inside this part: seek (stored) or read through (deflated)
                    img.seek(skip * IMAGE_BYTES, os.SEEK_CUR)
                    lab.seek(skip * part.label_dtype.itemsize, os.SEEK_CUR)
                row = skip
                while row < part.n:
                    reading = True
                    k = min(chunk, part.n - row)
                    images = _read_exact(img, k * IMAGE_BYTES, part.path, "image")
                    labels = np.frombuffer(_read_exact(lab, k * part.label_dtype.itemsize,
                                                       part.path, "label"),
                                           dtype=part.label_dtype)
                    outside = (labels < 0) | (labels >= num_classes)
                    if outside.any():
                        i = int(np.argmax(outside))  # the first bad row of the chunk
                        raise DataError(f"{part.path}: label {labels[i]} at row {row + i} is "
                                           f"outside [0, {num_classes - 1}] (--num-classes "
                                           f"{num_classes})")
                    reading = False
                    files["images.npy"].write(images)
                    files["labels.npy"].write(labels.astype("<i8").tobytes())
                    counts += np.bincount(labels, minlength=num_classes)
                    row += k
                    done += k
                    for f in files.values():  # data on disk before the progress record says so
                        f.flush()
                        os.fsync(f.fileno())
                    _write_json(progress_path, {**job, "done": done,
                                                "class_counts": counts.tolist()})
                    log(f"{part.path.name}: {row}/{part.n}")
                    reading = True
                # Reading past the end makes zipfile verify the member's CRC-32.
                img.read(1)
                lab.read(1)
        except (zipfile.BadZipFile, EOFError) as err:
            raise DataError(f"{part.path}: corrupt data ({err})") from None
        except OSError as err:
            if not reading:
                raise  # a full disk or a lost output directory: reported by prepare()
            raise DataError(f"{part.path}: corrupt data ({err})") from None
    return done, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare_generated",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".npz parts, concatenated in this order")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-classes", type=int, required=True,
                        help="labels must lie in [0, N): 10 for CIFAR-10, 100 for CIFAR-100")
    parser.add_argument("--chunk", type=int, default=1 << 16,
                        help="images per read/write (memory ~ 3 KB x chunk; default 65536)")
    args = parser.parse_args(argv)
    try:
        prepare(args.inputs, args.out, args.num_classes, chunk=args.chunk,
                log=lambda m: print(m, file=sys.stderr))
    except USER_ERRORS as err:
        return report("prepare_generated", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
