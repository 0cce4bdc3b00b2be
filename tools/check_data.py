"""Check annotation files and their images before a run: every record, every image fully decoded.

    python -m tools.check_data --config configs/Pretrain.yaml            # train_file (+ val_file, test_file)
    python -m tools.check_data --ann data/coco.json --image_root /data/coco [--workers 8] [--out bad.jsonl]

Any task config works (pre-training, retrieval, SNLI-VE, NLVR2, VQA): the YAML is read plainly for ``train_file``,
``val_file``, ``test_file``, ``image_root`` (``vqa_root`` / ``vg_root`` for VQA) and ``max_image_pixels``. Each
record must be an object with its image key(s) (``image``; ``images``, a list of paths, for NLVR2) and a non-empty
text (``caption``, ``sentence`` or ``question``: a string, or a list of non-empty strings), and SNLI-VE / NLVR2
records a label their data set reads (``entailment`` / ``neutral`` / ``contradiction``; ``True`` / ``False``). Images
are resolved as the data sets do (SNLI-VE ids get ``.jpg``) and decoded with :func:`dataset.images.load_rgb`, the
training loader, so missing, truncated, corrupt and over-sized files are all found. Each distinct image is checked once.

Prints a summary; writes one JSON line per bad record (``file``, ``index``, ``image``, ``reason``, ``detail``) to
``--out`` (``bad_records.jsonl`` in the current directory by default; written even when empty). Exit status: 0 when
every record is good, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from dataset.images import (DEFAULT_MAX_IMAGE_PIXELS, BadImageError, DataError, check_image_options, describe_roots,
                            load_rgb)

TEXT_KEYS = ("caption", "sentence", "question", "text")  # text: RefCOCO+ (grounding) records
_FROM_CONFIG: Any = object()


def _files(value: Any) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _resolve(path: str, root: Optional[str], ann_file: str) -> str:
    if os.path.isabs(path):
        return path
    return os.path.join(root if root else os.path.dirname(os.path.abspath(ann_file)), path)


def _text_problem(rec: Dict[str, Any]) -> Optional[str]:
    key = next((k for k in TEXT_KEYS if k in rec), None)
    if key is None:
        return f"no text key ({'/'.join(TEXT_KEYS)})"
    text = rec[key]
    if isinstance(text, str):
        return None if text.strip() else f"empty {key}"
    if isinstance(text, list):
        if not text:
            return f"empty {key} list"
        if not all(isinstance(t, str) and t.strip() for t in text):
            return f"{key} list has an empty or non-string entry"
        return None
    return f"{key} is a {type(text).__name__}, not a string or a list of strings"


def _label_problem(rec: Dict[str, Any]) -> Optional[str]:
    """An SNLI-VE or NLVR2 record's label that the task's data set would refuse (``'Entailment'``, ``'true'``, ...)."""
    if "label" not in rec or not isinstance(rec.get("sentence"), str):
        return None
    from dataset import nlvr_dataset, ve_dataset

    task = nlvr_dataset if "images" in rec else ve_dataset
    try:
        task.record_fields(rec, 30, "record")
    except DataError as e:
        return str(e).replace("record has ", "", 1)
    return None


def _image_paths(rec: Dict[str, Any], ann_file: str, image_root: Optional[str], vqa_root: Optional[str],
                 vg_root: Optional[str]) -> Tuple[List[str], Optional[str]]:
    """The record's resolved image paths, or a problem."""
    if "images" in rec:  # NLVR2
        images = rec["images"]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            return [], f"'images' must be a list of paths, got {images!r}"[:200]
        return [_resolve(p, image_root, ann_file) for p in images], None
    if "image" not in rec:
        return [], "no image key ('image' or 'images')"
    image = rec["image"]
    if not isinstance(image, str) or not image:
        return [], f"'image' must be a non-empty path, got {image!r}"[:200]
    if "question" in rec:  # VQA: the root depends on the record's data set
        root = vg_root if rec.get("dataset", "vqa") == "vg" else vqa_root
        return [_resolve(image, root if root else image_root, ann_file)], None
    if "sentence" in rec:  # SNLI-VE: an id without extension, as the data set reads it
        return [_resolve(f"{image}.jpg", image_root, ann_file)], None
    return [_resolve(image, image_root, ann_file)], None


def _check_image(job: Tuple[str, Optional[int]]) -> Tuple[str, Optional[Tuple[str, str]]]:
    path, max_pixels = job
    try:
        load_rgb(path, max_pixels)
        return path, None
    except BadImageError as e:
        return path, (e.reason, e.detail)


def check(ann_files: Sequence[str], image_root: Optional[str] = None, vqa_root: Optional[str] = None,
          vg_root: Optional[str] = None, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
          workers: int = 0, progress: bool = True) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Check ``ann_files``; returns ``(bad records, summary)``."""
    bad: List[Dict[str, Any]] = []
    records: List[Tuple[str, int, List[str], List[str]]] = []  # file, index, image paths, record problems
    n_records = n_bad_text = 0
    for f in ann_files:
        try:
            with open(f) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as e:
            bad.append({"file": f, "index": None, "image": None, "reason": "unreadable annotation file",
                        "detail": str(e)})
            continue
        if not isinstance(data, list):
            bad.append({"file": f, "index": None, "image": None, "reason": "not a JSON list of records",
                        "detail": f"top level is a {type(data).__name__}"})
            continue
        for i, rec in enumerate(data):
            n_records += 1
            if not isinstance(rec, dict):
                records.append((f, i, [], [f"record is a {type(rec).__name__}, not an object"]))
                continue
            problems = []
            paths, image_problem = _image_paths(rec, f, image_root, vqa_root, vg_root)
            if image_problem:
                problems.append(image_problem)
            text_problem = _text_problem(rec)
            if text_problem:
                problems.append(text_problem)
                n_bad_text += 1
            label_problem = _label_problem(rec)
            if label_problem:
                problems.append(label_problem)
            records.append((f, i, paths, problems))

    unique = sorted({p for _, _, paths, _ in records for p in paths})
    results: Dict[str, Optional[Tuple[str, str]]] = {}
    jobs = [(p, max_image_pixels) for p in unique]
    bar = tqdm(total=len(jobs), desc="images", unit="img", disable=not progress, file=sys.stderr)
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.Pool(min(workers, len(jobs))) as pool:
            chunk = max(1, min(64, len(jobs) // (4 * workers)))
            for path, res in pool.imap_unordered(_check_image, jobs, chunksize=chunk):
                results[path] = res
                bar.update()
    else:
        for job in jobs:
            path, res = _check_image(job)
            results[path] = res
            bar.update()
    bar.close()

    bad_image_reasons = Counter(res[0] for res in results.values() if res is not None)
    for f, i, paths, problems in records:
        failing = [(p, results[p]) for p in paths if results.get(p) is not None]
        reasons = [f"{res[0]} image" for _, res in failing] + problems
        if not reasons:
            continue
        bad.append({"file": f, "index": i, "image": failing[0][0] if failing else (paths[0] if paths else None),
                    "reason": "; ".join(reasons),
                    "detail": "; ".join(f"{p}: {res[1]}" if res[1] else p for p, res in failing)})
    summary = {"files": len(ann_files), "records": n_records, "images_checked": len(unique),
               "bad_images": sum(bad_image_reasons.values()), "bad_images_by_reason": dict(bad_image_reasons),
               "bad_captions": n_bad_text, "bad_records": len(bad)}
    return bad, summary


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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a task YAML: its train_file, val_file and test_file are checked")
    src.add_argument("--ann", nargs="+", action="extend", help="annotation JSON file(s); repeatable")
    p.add_argument("--image_root", default=None, help="prefix for relative image paths (overrides the config's)")
    p.add_argument("--max_image_pixels", type=_pixels, default=_FROM_CONFIG,
                   help=f"larger images are bad; 'none' = no limit (default: the config's, else "
                        f"{DEFAULT_MAX_IMAGE_PIXELS})")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--out", default="bad_records.jsonl", help="bad records, one JSON line each")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    vqa_root = vg_root = None
    max_pixels: Any = DEFAULT_MAX_IMAGE_PIXELS
    if args.config:
        from utils.config import yaml_load

        with open(args.config) as f:
            cfg = yaml_load(f) or {}
        if not isinstance(cfg, dict):
            print(f"{args.config}: the top level must be a mapping of keys", file=sys.stderr)
            return 2
        files = [p for key in ("train_file", "val_file", "test_file") for p in _files(cfg.get(key))]
        if not files:
            print(f"{args.config}: no train_file / val_file / test_file", file=sys.stderr)
            return 2
        image_root = args.image_root or cfg.get("image_root")
        vqa_root, vg_root = cfg.get("vqa_root"), cfg.get("vg_root")
        max_pixels = cfg.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
        try:
            check_image_options("raise", max_pixels)
        except ValueError as e:
            print(f"{args.config}: {e}", file=sys.stderr)
            return 2
    else:
        files, image_root = list(args.ann), args.image_root
    if args.max_image_pixels is not _FROM_CONFIG:
        max_pixels = args.max_image_pixels
    if args.image_root:  # given on the command line: it wins for VQA's roots too
        vqa_root = vg_root = args.image_root

    bad, summary = check(files, image_root, vqa_root, vg_root, max_pixels, args.workers, not args.no_progress)
    with open(args.out, "w") as f:
        for rec in bad:
            f.write(json.dumps(rec) + "\n")
    print(f"checked {summary['records']} records in {summary['files']} file(s): {summary['images_checked']} "
          f"distinct images")
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary["bad_images_by_reason"].items())) or "none"
    print(f"bad images: {summary['bad_images']} ({reasons})")
    print(f"bad captions: {summary['bad_captions']}")
    print(f"bad records: {summary['bad_records']} (written to {os.path.abspath(args.out)})")
    for rec in bad[:10]:
        where = rec["file"] if rec["index"] is None else f"{rec['file']}[{rec['index']}]"
        print(f"  {where}: {rec['reason']}" + (f" ({rec['image']})" if rec["image"] else "")
              + (f": {rec['detail']}" if rec["index"] is None and rec.get("detail") else ""))
    if summary["bad_images_by_reason"].get("missing") == summary["images_checked"] > 0:
        print(f"every image is missing: check image_root ({describe_roots(files, image_root)})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
