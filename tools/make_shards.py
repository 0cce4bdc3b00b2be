"""Convert annotation JSON files into webdataset tar shards, for any task that trains from ``train_shards``.

    python -m tools.make_shards --ann data/synthetic/pretrain.json --out shards/pretrain-%06d.tar
    python -m tools.make_shards --ann cc3m.json --ann sbu.json --image_root /data --out /fast/pt-%06d.tar \\
        --samples_per_shard 1000 --max_side 384 --quality 90 --workers 16
    python -m tools.make_shards --task ve --ann data/ve_train.json --image_root /data/flickr30k --out ve/x-%06d.tar
    python -m tools.make_shards --task nlvr --ann data/nlvr_train.json --image_root /data/nlvr2 --out nlvr/x-%06d.tar
    python -m tools.make_shards --task vqa --ann data/vqa_train.json --ann data/vg_qa.json \\
        --vqa_root /data/coco --vg_root /data/vg --out vqa/x-%06d.tar
    python -m tools.make_shards --task grounding --ann data/refcoco+_train.json --image_root /data/coco \\
        --out grounding/x-%06d.tar

``--task`` (default ``pretrain``) says what the records are, and which script reads the shards (``train_shards``):

* ``pretrain``: ``{"image": path, "caption": str | [str, ...], ...}``, the pre-training format, and the
  retrieval-train format (its ``image_id`` is kept): ``Pretrain.py``, ``Pretrain_nlvr.py``, ``Retrieval.py``;
* ``ve``: SNLI-VE ``{"image": id without extension, "sentence", "label"}`` (the file ``<image>.jpg``): ``VE.py``;
* ``nlvr``: NLVR2 ``{"images": [left, right], "sentence", "label"}``, two images per sample: ``NLVR.py``;
* ``vqa``: VQA / VG QA training records ``{"question", "image", "answer", "dataset": "vqa" | "vg"}``, the image
  resolved against ``--vqa_root`` or ``--vg_root`` by ``dataset``: ``VQA.py``;
* ``grounding``: RefCOCO+ ``{"image", "text", ...}``: ``Grounding.py``.

Each record is checked, and its image paths resolved, by the same code as the task's JSON data set (so a record
that data set would refuse stops the conversion here). Relative image paths are resolved against ``--image_root``
(``--vqa_root`` / ``--vg_root`` for VQA), else the JSON file's folder, as the data sets do.

Output: tar shards written with webdataset's ``TarWriter``, ``--samples_per_shard`` samples each (the last one may
hold fewer), in the order of the records (``--ann`` files concatenated). Each sample has

* ``__key__``: the record's index over all ``--ann`` files, zero-padded (``000000042``); it does not change with
  the worker count, and a skipped bad image leaves a gap;
* ``jpg`` (``nlvr``: ``left.jpg`` and ``right.jpg``, the record's ``images`` in order): the image. The file's own
  bytes when it is a JPEG that needs no resizing (no ``--max_side``, or its longer side is already at most
  ``--max_side``); otherwise the image decoded with :func:`dataset.images.load_rgb` (16-bit greys scaled, CMYK
  converted, transparency composited on white), resized (bicubic, antialiased) so its longer side is at most
  ``--max_side`` keeping the aspect ratio, and re-encoded as an RGB JPEG at ``--quality``. Every image is fully
  decoded once, kept or not;
* ``json``: the record's keys (``caption``, ``image`` as written in the JSON, ``image_id``, ...) plus
  ``image_path``, the resolved path that was read (``nlvr``: ``image_paths``, both).

Bad images (:class:`dataset.images.BadImageError`: missing, truncated, corrupt, over ``--max_image_pixels``, ...)
are skipped, counted in the summary and written one JSON line each (``file``, ``index``, ``image``, ``reason``,
``detail``) to ``--bad_out`` (default ``bad_records.jsonl`` next to the shards; written even when empty); an NLVR2
pair with a bad image is skipped whole. A structurally wrong record (no ``image`` or ``caption``, an empty caption
list, an unknown label, ...) stops the conversion: fix the JSON.

Each shard is written to ``NAME.tmp`` and renamed when complete, so a killed conversion never leaves a torn shard
under a final name. The output is byte-for-byte the same for any ``--workers`` (tar mtimes are 0). An existing
first shard makes the tool stop unless ``--overwrite`` is given.

Prints a summary (samples, bad images, shards, bytes, seconds) and the ``train_shards`` /
``train_samples_per_epoch`` config lines for the result.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, load_rgb

JPEG_MAGIC = b"\xff\xd8\xff"


def _pixels(value: str) -> Optional[int]:
    if value.lower() in ("none", "null"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value!r}")
    return n


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


TASKS = ("pretrain", "ve", "nlvr", "vqa", "grounding")


def image_members(task: str) -> Tuple[str, ...]:
    """The tar members of a sample's images, one per image of a record: ``jpg``, or NLVR2's ``left.jpg`` and
    ``right.jpg`` (what ``dataset.shards.ShardDataset`` reads)."""
    if task == "nlvr":
        from dataset.nlvr_dataset import IMAGE_MEMBERS

        return tuple(f"{name}.jpg" for name in IMAGE_MEMBERS)
    return ("jpg",)


def _pretrain_record(rec: Dict[str, Any], f: str, i: int, roots: Dict[str, Optional[str]]) -> List[str]:
    from dataset.caption_dataset import resolve_image

    cap = rec["caption"]
    ok = isinstance(cap, str) or (isinstance(cap, list) and cap and all(isinstance(c, str) for c in cap))
    if not ok:
        raise ValueError(f"{f}: record {i}: caption must be a string or a non-empty list of strings: "
                         f"{json.dumps(rec)[:200]}")
    if not isinstance(rec["image"], str) or not rec["image"]:
        raise ValueError(f"{f}: record {i}: image must be a non-empty path: {json.dumps(rec)[:200]}")
    return [resolve_image(rec["image"], roots["image_root"], f)]


def _task_reader(task: str):
    """``(required keys, check(rec, file, index, roots) -> resolved image paths)`` of ``task``: the checks and
    paths of the task's JSON data set."""
    if task == "pretrain":
        return ("image", "caption"), _pretrain_record
    if task == "ve":
        from dataset import ve_dataset as ve

        def check(rec, f, i, roots):
            ve.record_fields(rec, 30, f"{f}: record {i}")
            return ve.image_paths(rec, roots["image_root"], f)

        return ve.REQUIRED, check
    if task == "nlvr":
        from dataset import nlvr_dataset as nlvr

        def check(rec, f, i, roots):
            paths = nlvr.image_paths(rec, roots["image_root"], f, f"{f}: record {i}")
            nlvr.record_fields(rec, 30, f"{f}: record {i}")
            return paths

        return nlvr.REQUIRED, check
    if task == "vqa":
        from dataset import vqa_dataset as vqa

        def check(rec, f, i, roots):
            paths = vqa.image_paths(rec, roots["vqa_root"], roots["vg_root"], f, f"{f}: record {i}")
            vqa.record_fields(rec, "train", 30, f"{f}: record {i}")
            return paths

        return vqa.required_keys("train"), check
    if task == "grounding":
        from dataset import grounding
        from dataset.caption_dataset import resolve_image

        def check(rec, f, i, roots):
            grounding.record_fields(rec, "train", 30, f"{f}: record {i}")
            return [resolve_image(rec["image"], roots["image_root"], f)]

        return grounding.required_keys("train"), check
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def read_records(ann_files: Sequence[str], image_root: Optional[str], task: str = "pretrain",
                 vqa_root: Optional[str] = None, vg_root: Optional[str] = None) -> List[Dict[str, Any]]:
    """All records of ``ann_files`` in order, each with ``_file``, ``_index`` (in its file) and ``_paths`` (the
    resolved image paths, one per member of :func:`image_members`) added. Raises ``ValueError`` /
    ``FileNotFoundError`` naming the file and record."""
    from dataset.caption_dataset import load_json_list

    required, check = _task_reader(task)
    roots = {"image_root": image_root, "vqa_root": vqa_root, "vg_root": vg_root}
    out: List[Dict[str, Any]] = []
    for f in ann_files:
        for i, rec in enumerate(load_json_list(f, required)):
            out.append(dict(rec, _file=f, _index=i, _paths=check(rec, f, i, roots)))
    return out


def encode_image(path: str, max_side: Optional[int], quality: int,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Tuple[bytes, Tuple[int, int]]:
    """``(JPEG bytes, (width, height) stored)`` for ``path`` (rules in the module docstring); raises
    :class:`BadImageError`."""
    from PIL import Image

    im = load_rgb(path, max_image_pixels)  # full decode: validates the file whatever is stored
    w, h = im.size
    if max_side is None or max(w, h) <= max_side:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadImageError(path, "unreadable", f"{type(e).__name__}: {e}") from e
        if data[:3] == JPEG_MAGIC:
            return data, (w, h)
    else:
        scale = max_side / max(w, h)
        size = (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))
        im = im.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), im.size


def _convert(job: Tuple[int, Tuple[str, ...], Optional[int], int, Optional[int]]):
    """``(index, [bytes per image], [(path, reason, detail) per bad image])``: every image is tried."""
    index, paths, max_side, quality, max_pixels = job
    datas, errors = [], []
    for path in paths:
        try:
            datas.append(encode_image(path, max_side, quality, max_pixels)[0])
        except BadImageError as e:
            errors.append((path, e.reason, e.detail))
    return index, datas, errors


class _Shards:
    """Numbered tar shards of ``per_shard`` samples, each written to ``NAME.tmp`` and renamed when closed."""

    def __init__(self, pattern: str, per_shard: int):
        import webdataset as wds

        self._wds = wds
        self.pattern, self.per_shard = pattern, per_shard
        self.names: List[str] = []
        self.bytes = 0
        self._file = self._writer = None
        self._count = 0

    def write(self, sample: Dict[str, Any]) -> None:
        if self._writer is None or self._count >= self.per_shard:
            self._close()
            name = self.pattern % len(self.names)
            os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
            self._file = open(name + ".tmp", "wb")
            self._writer = self._wds.TarWriter(self._file, encoder=False, mtime=0, mode=0o444)  # int: no PAX header
            self.names.append(name)
            self._count = 0
        self._writer.write(sample)
        self._count += 1

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # a file object we opened: TarWriter leaves it open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self.names[-1]
        os.replace(name + ".tmp", name)
        self.bytes += os.path.getsize(name)
        self._writer = self._file = None

    def close(self) -> None:
        self._close()


def _results(jobs: List[tuple], workers: int) -> Iterator[tuple]:
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.Pool(min(workers, len(jobs))) as pool:
            chunk = max(1, min(16, len(jobs) // (8 * workers)))
            yield from pool.imap(_convert, jobs, chunksize=chunk)  # in order: output independent of workers
    else:
        for job in jobs:
            yield _convert(job)


def brace_pattern(pattern: str, num_shards: int) -> str:
    """``shards/pt-%06d.tar`` and 13 shards -> ``shards/pt-{000000..000012}.tar`` (webdataset's brace syntax)."""
    if num_shards == 1:
        return pattern % 0
    m = re.search(r"%[-0-9]*d", pattern)
    if m is None:
        raise ValueError(f"no integer field in {pattern!r}")
    field = m.group(0)
    return (pattern[:m.start()].replace("%%", "%") + "{" + field % 0 + ".." + field % (num_shards - 1) + "}"
            + pattern[m.end():].replace("%%", "%"))


def make_shards(ann_files: Sequence[str], out: str, image_root: Optional[str] = None, samples_per_shard: int = 1000,
                max_side: Optional[int] = None, quality: int = 90, workers: int = 0,
                max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, overwrite: bool = False,
                progress: bool = False, *, task: str = "pretrain", vqa_root: Optional[str] = None,
                vg_root: Optional[str] = None) -> Dict[str, Any]:
    """Write the shards of ``task``'s records (``vqa_root`` / ``vg_root``: VQA's image roots); returns the summary:
    ``records``, ``samples``, ``bad`` (list of bad-image dicts), ``shards`` (paths), ``bytes``, ``seconds``,
    ``pattern`` (brace form for ``train_shards``)."""
    try:
        out % 0
    except (TypeError, ValueError):
        raise ValueError(f"--out must contain one integer field such as %06d, got {out!r}") from None
    if out % 0 == out % 1:
        raise ValueError(f"--out must contain one integer field such as %06d, got {out!r}")
    if task == "vqa" and image_root:
        raise ValueError("--task vqa resolves images with --vqa_root / --vg_root (by each record's dataset), "
                         "not --image_root")
    if task != "vqa" and (vqa_root or vg_root):
        raise ValueError("--vqa_root / --vg_root are for --task vqa; the other tasks take --image_root")
    if os.path.exists(out % 0) and not overwrite:
        raise FileExistsError(f"{out % 0} exists; pass --overwrite to replace these shards")
    t0 = time.time()
    records = read_records(ann_files, image_root, task, vqa_root, vg_root)
    members = image_members(task)
    width = max(9, len(str(max(len(records) - 1, 0))))
    jobs = [(i, tuple(r["_paths"]), max_side, quality, max_image_pixels) for i, r in enumerate(records)]
    shards = _Shards(out, samples_per_shard)
    bad: List[Dict[str, Any]] = []
    samples = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="shards", unit="img", file=sys.stderr)
    try:
        for index, datas, errors in _results(jobs, workers):
            rec = records[index]
            if bar is not None:
                bar.update()
            if errors:  # the whole record is skipped (both images of a pair)
                bad.extend({"file": rec["_file"], "index": rec["_index"], "image": path, "reason": reason,
                            "detail": detail} for path, reason, detail in errors)
                continue
            meta = {k: v for k, v in rec.items() if not k.startswith("_")}
            if len(members) == 1:
                meta["image_path"] = rec["_paths"][0]
            else:
                meta["image_paths"] = rec["_paths"]
            shards.write({"__key__": f"{index:0{width}d}", **dict(zip(members, datas)),
                          "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            samples += 1
    finally:
        shards.close()
        if bar is not None:
            bar.close()
    stale = out % len(shards.names)
    if overwrite and os.path.exists(stale):
        print(f"warning: {stale} is left from an earlier conversion; it is not part of this one", file=sys.stderr)
    return {"records": len(records), "samples": samples, "bad": bad, "shards": shards.names, "bytes": shards.bytes,
            "seconds": time.time() - t0,
            "pattern": brace_pattern(out, len(shards.names)) if shards.names else None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="pretrain",
                   help="what the records are (default: pre-training / retrieval-train records)")
    p.add_argument("--ann", action="append", required=True, help="annotation JSON file (repeat for more)")
    p.add_argument("--image_root", default=None, help="prefix for relative image paths (default: the JSON's folder)")
    p.add_argument("--vqa_root", default=None, help="--task vqa: prefix for the images of 'dataset: vqa' records")
    p.add_argument("--vg_root", default=None, help="--task vqa: prefix for the images of 'dataset: vg' records")
    p.add_argument("--out", required=True, help="shard path pattern with an integer field, e.g. shards/pt-%%06d.tar")
    p.add_argument("--samples_per_shard", type=_positive, default=1000)
    p.add_argument("--max_side", type=_positive, default=None,
                   help="resize so the longer side is at most this (default: keep the size)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--max_image_pixels", type=_pixels, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="larger images are bad; 'none' = no limit")
    p.add_argument("--bad_out", default=None, help="bad records, one JSON line each (default: bad_records.jsonl "
                                                   "next to the shards)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must be in [1, 100], got {args.quality}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        s = make_shards(args.ann, args.out, args.image_root, args.samples_per_shard, args.max_side, args.quality,
                        args.workers, args.max_image_pixels, args.overwrite, progress=not args.no_progress,
                        task=args.task, vqa_root=args.vqa_root, vg_root=args.vg_root)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 2
    bad_out = args.bad_out or os.path.join(os.path.dirname(os.path.abspath(args.out % 0)), "bad_records.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(bad_out)), exist_ok=True)
    with open(bad_out, "w") as f:
        for rec in s["bad"]:
            f.write(json.dumps(rec) + "\n")
    reasons = Counter(b["reason"] for b in s["bad"])
    rate = s["samples"] / max(s["seconds"], 1e-9)
    print(f"records: {s['records']} in {len(args.ann)} file(s)")
    print(f"samples: {s['samples']} written, {len(s['bad'])} bad image(s) skipped"
          + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if reasons else ""))
    print(f"shards: {len(s['shards'])} ({s['pattern']})")
    print(f"bytes: {s['bytes']} ({s['bytes'] / 2**20:.1f} MiB, {s['bytes'] / max(s['samples'], 1) / 1024:.1f} KiB "
          f"per sample)")
    print(f"seconds: {s['seconds']:.1f} ({rate:.1f} samples/s)")
    print(f"bad records written to {os.path.abspath(bad_out)}")
    for b in s["bad"][:10]:
        print(f"  {b['file']}[{b['index']}]: {b['reason']} ({b['image']})")
    if s["pattern"]:
        print(f"config: train_shards: {s['pattern']}\n        train_samples_per_epoch: {s['samples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
