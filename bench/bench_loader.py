"""Data-loading benchmark: images/s of one loader worker for the JSON + JPEG path and for tar shards.

    python bench/bench_loader.py                      # 200 photos (half 640x480, half 1024x768), 256 px transform
    python bench/bench_loader.py --images 400 --samples 400 --repeat 5 --json loader.json

Needs scikit-image for its sample photos (``pip install scikit-image``; not a project dependency). The photos
(astronaut, coffee, chelsea, rocket, Hubble deep field, immunohistochemistry, retina) are cropped at random to 4:3,
resized to 640x480 or 1024x768 and saved as quality-90 JPEGs; ``tools.make_shards`` then writes them as shards
twice: the original files, and pre-resized to ``--max_side`` (384).

Every row runs in this process with one torch thread (what a DataLoader worker gets), so its images/s is per
worker. Times are this process's CPU time (``time.process_time``; the work is single-threaded, so it equals the
wall time on an idle machine and is hardly changed by other processes); torch and ``random`` are re-seeded before
each run (the same crops and RandAugment draws everywhere); ``--repeat`` rounds run every row in turn and the best
run of each row is kept. Rows:

* the training sample (decode, the default pre-training ``train_transform`` at ``--image_res``: RandomResizedCrop
  + flip + RandAugment + to tensor + normalise; the caption) made by ``PretrainDataset`` through ``SeededSamples``
  (the JSON path), by ``ShardDataset`` over the full-size shards and over the pre-resized ones (a 1000-sample
  shuffle buffer, timed once it is full), and from the original files decoded in JPEG draft mode (PIL's
  ``Image.draft('RGB', size)``: DCT scaling by 1/2, 1/4 or 1/8 while decoding, asked for the size the
  ``--max_side`` pre-resize gives; it only scales when the image is at least twice that size); then the JSON path
  and the pre-resized shards again with ``normalize_on_device: true``'s transform (``uint8_output``: a uint8
  tensor out, the normalisation left to the training device);
* a cumulative breakdown, for the original files (the JSON path) and the pre-resized JPEG bytes: decode only
  (``load_rgb``), + RandomResizedCrop, + flip + RandAugment, + to tensor + normalise (the whole transform); for
  comparison the same with a uint8 tensor out (``normalize_on_device``); and draft-mode decoding alone.

Also the cost of collating a batch of 64 (``torch.stack``, in the worker) per image, float32 and uint8. Prints two
markdown tables; ``--json FILE`` keeps the numbers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image, features  # noqa: E402
from torchvision.transforms import v2 as T  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SIZES = ((640, 480), (1024, 768))
COLLATE_BATCH = 64


def make_photos(folder: str, n: int, seed: int = 0) -> List[Dict[str, str]]:
    """``n`` JPEGs (quality 90) cropped and resized from scikit-image's photos; returns the pre-training records."""
    try:
        import skimage.data
    except ImportError:
        sys.exit("bench_loader needs scikit-image for its sample photos: pip install scikit-image "
                 "(it is not a dependency of the project)")
    sources = []
    for name in PHOTOS:  # a photo that this scikit-image would have to download is left out
        try:
            sources.append((name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB")))
        except Exception as e:  # noqa: BLE001
            print(f"bench_loader: photo {name} unavailable ({type(e).__name__}); left out", file=sys.stderr)
    if not sources:
        sys.exit("bench_loader: none of scikit-image's sample photos could be loaded")
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records = []
    for i in range(n):
        name, src = sources[i % len(sources)]
        size = SIZES[(i // len(sources)) % len(SIZES)]
        w, h = src.size
        scale = rng.uniform(0.6, 1.0)
        cw = min(w, h * 4 / 3) * scale
        ch = cw * 3 / 4
        x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        im = src.crop((round(x), round(y), round(x + cw), round(y + ch))).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = os.path.join("images", f"{name}_{i:04d}.jpg")
        im.save(os.path.join(folder, path), quality=90)
        records.append({"image": path, "caption": [f"a photo of the {name.replace('_', ' ')}", f"picture {i}"]})
    return records


def measure(make: Callable[[], Callable[[], object]], samples: int, warmup: int) -> float:
    """images/s of one run in CPU time of this process (single-threaded work, so other processes on the machine
    hardly change it); ``make()`` returns a function that produces one sample per call."""
    torch.manual_seed(0)  # the same crops and RandAugment draws in every run and row
    random.seed(0)
    step = make()
    for _ in range(warmup):
        step()
    t0 = time.process_time()
    for _ in range(samples):
        step()
    return samples / max(time.process_time() - t0, 1e-9)


def best_of(jobs: Dict[str, Callable[[], Callable[[], object]]], samples: int, warmup: int,
            repeat: int) -> Dict[str, float]:
    """Best images/s of each job over ``repeat`` rounds; the rounds run every job in turn."""
    best = {name: 0.0 for name in jobs}
    for r in range(repeat):
        for name, make in jobs.items():
            best[name] = max(best[name], measure(make, samples, warmup))
            print(f"  round {r + 1}: {name}: {best[name]:.1f} images/s", file=sys.stderr)
    return best


def cycle(items: List, fn: Callable) -> Callable[[], Callable[[], object]]:
    def make():
        it = iter(range(10**12))
        return lambda: fn(items[next(it) % len(items)])
    return make


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="photos to write")
    p.add_argument("--samples", type=int, default=200, help="samples timed per run")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--image_res", type=int, default=256)
    p.add_argument("--max_side", type=int, default=384)
    p.add_argument("--shuffle_buffer", type=int, default=1000)
    p.add_argument("--workdir", default=None, help="keep the photos and shards here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    if args.workdir:
        return run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as work:  # 40 MB of photos and shards, removed after
        return run(args, work)


def run(args, work: str) -> int:
    from dataset.caption_dataset import PretrainDataset
    from dataset.images import load_rgb
    from dataset.sampling import SeededSamples, sample_seed
    from dataset.shards import ShardDataset
    from dataset.transforms import AugmentConfig, randaugment, train_transform, uint8_output
    from tools.make_shards import make_shards

    records = make_photos(work, args.images)
    ann = os.path.join(work, "pretrain.json")
    with open(ann, "w") as f:
        json.dump(records, f)
    full = make_shards([ann], os.path.join(work, "full", "s-%04d.tar"), samples_per_shard=50,
                       workers=os.cpu_count() or 1, overwrite=True)
    small = make_shards([ann], os.path.join(work, f"r{args.max_side}", "s-%04d.tar"), samples_per_shard=50,
                        max_side=args.max_side, workers=os.cpu_count() or 1, overwrite=True)

    aug = AugmentConfig()
    tf = train_transform(args.image_res, aug)
    tf_uint8 = uint8_output(tf)  # normalize_on_device: true
    crop = T.RandomResizedCrop(args.image_res, scale=tuple(aug.crop_scale), interpolation=T.InterpolationMode.BICUBIC,
                               antialias=True)
    augment = T.Compose([crop, T.RandomHorizontalFlip(), randaugment(aug)])
    paths = [os.path.join(work, r["image"]) for r in records]
    small_bytes = [r["jpg"] for r in _raw(small["shards"])]

    def json_path(transform):
        def make():
            ds = SeededSamples(PretrainDataset(ann, transform, max_words=30))
            order = list(range(len(ds)))
            random.Random(0).shuffle(order)
            it = iter(range(10**12))

            def step():
                k = next(it)
                i = order[k % len(order)]
                return ds[(i, sample_seed(0, 0, k))]
            return step
        return make

    def shard_path(pattern, transform):
        def make():
            ds = ShardDataset(pattern, transform, 30, 10**9, shuffle_buffer=args.shuffle_buffer, seed=0)
            it = iter(ds)
            return lambda: next(it)
        return make

    def collate_ms(transform) -> float:
        """Best ms per image of stacking a batch of the transform's outputs (what a collate function does)."""
        torch.manual_seed(0)
        images = [transform(load_rgb(io.BytesIO(small_bytes[i % len(small_bytes)]))) for i in range(COLLATE_BATCH)]
        times = []
        for _ in range(args.repeat):
            t0 = time.process_time()
            for _ in range(5):
                torch.stack(images)
            times.append((time.process_time() - t0) / (5 * COLLATE_BATCH) * 1e3)
        return min(times)

    def draft_decode(path):
        with Image.open(path) as im:
            w, h = im.size
            s = args.max_side / max(w, h)
            im.draft("RGB", (round(w * s), round(h * s)))
            im.load()
            return im.convert("RGB")

    def transforms_of(decode):
        return [("decode only", decode), ("+ RandomResizedCrop", lambda x: crop(decode(x))),
                ("+ flip + RandAugment", lambda x: augment(decode(x))),
                ("+ to tensor + normalise (whole transform)", lambda x: tf(decode(x))),
                ("(instead: + to uint8 tensor only, normalize_on_device)", lambda x: tf_uint8(decode(x)))]

    sizes = [Image.open(q).size for q in paths]
    mean_px = sum(w * h for w, h in sizes) / len(sizes)
    rows = [
        ("JSON + full-size JPEG (PretrainDataset)", json_path(tf)),
        ("shards, full-size JPEG (ShardDataset)", shard_path(full["pattern"], tf)),
        (f"shards, pre-resized to max_side {args.max_side} (ShardDataset)", shard_path(small["pattern"], tf)),
        (f"full-size JPEG, draft mode to the {args.max_side} size (PIL), + whole transform",
         cycle(paths, lambda q: tf(draft_decode(q)))),
        ("JSON + full-size JPEG, uint8 out (normalize_on_device)", json_path(tf_uint8)),
        (f"shards, pre-resized to max_side {args.max_side}, uint8 out (normalize_on_device)",
         shard_path(small["pattern"], tf_uint8)),
    ]
    breakdown = [(name, cycle(paths, fn), cycle(small_bytes, fn_small)) for (name, fn), (_, fn_small) in
                 zip(transforms_of(load_rgb), transforms_of(lambda b: load_rgb(io.BytesIO(b))))]
    breakdown.append((f"draft-mode decode only (PIL, to the {args.max_side} size)", cycle(paths, draft_decode), None))
    jobs = dict(rows)
    for name, make_full, make_small in breakdown:
        jobs["full: " + name] = make_full
        if make_small is not None:
            jobs["small: " + name] = make_small
    best = best_of(jobs, args.samples, args.warmup, args.repeat)
    results = [{"row": name, "images_per_s": best[name]} for name, _ in rows]
    parts = [{"row": name, "full_images_per_s": best["full: " + name],
              "pre_resized_images_per_s": best.get("small: " + name)} for name, _, _ in breakdown]
    base = results[0]["images_per_s"]
    collate = {"float32": collate_ms(tf), "uint8": collate_ms(tf_uint8)}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    print(f"\n{args.images} photos ({', '.join(f'{w}x{h}' for w, h in SIZES)}, quality 90, mean "
          f"{mean_px / 1e6:.2f} Mpx; {full['bytes'] / max(full['samples'], 1) / 1024:.0f} KiB per sample in shards, "
          f"{small['bytes'] / max(small['samples'], 1) / 1024:.0f} KiB pre-resized), train transform at "
          f"{args.image_res} px, 1 torch thread, CPU time, best of {args.repeat} x {args.samples} samples. CPU: "
          f"{cpu}; Pillow {Image.__version__} (libjpeg-turbo: {features.check_feature('libjpeg_turbo')}), torch "
          f"{torch.__version__}\n")
    print("| training sample (decode + train transform + caption) | images/s per worker | ms / image | vs JSON |")
    print("|---|---:|---:|---:|")
    for r in results:
        ips = r["images_per_s"]
        print(f"| {r['row']} | {ips:.1f} | {1000 / ips:.2f} | {ips / base:.2f}x |")
    print(f"\n| breakdown (cumulative), images/s per worker | full-size JPEG (JSON path) | "
          f"pre-resized {args.max_side} |")
    print("|---|---:|---:|")
    for r in parts:
        b = r["pre_resized_images_per_s"]
        print(f"| {r['row']} | {r['full_images_per_s']:.1f} | {'-' if b is None else f'{b:.1f}'} |")
    print(f"\nCollating a batch in the worker (torch.stack of {COLLATE_BATCH} images), per image: float32 "
          f"{collate['float32']:.3f} ms, uint8 {collate['uint8']:.3f} ms (not in the rows above).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "breakdown": parts, "collate_ms_per_image": collate, "images": args.images,
                       "image_res": args.image_res, "max_side": args.max_side, "cpu": cpu}, f, indent=1)
    return 0


def _raw(shards: List[str]):
    import webdataset as wds

    return list(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))


if __name__ == "__main__":
    sys.exit(main())
