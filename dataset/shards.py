"""Training data streamed from webdataset tar shards (written by ``python -m tools.make_shards``).

:class:`ShardDataset` yields the samples of a task's map-style data set, and :func:`create_shard_loader` is the
shard counterpart of :func:`dataset.sampling.create_train_loader`. What a sample is comes from a
:class:`ShardSample`, the task's half: the json keys and image members it needs and how a decoded record becomes
the sample. The default, :class:`PretrainSample`, gives the samples of
:class:`dataset.caption_dataset.PretrainDataset` (``{'image': tensor, 'caption': str, 'bad_images': [str, ...]}``,
``pre_caption`` applied, one caption drawn at random from a list; with ``id_key`` also ``idx``, for retrieval).
The fine-tuning tasks define theirs next to their data sets, with the record code those share:
``dataset.ve_dataset.VEShardSample``, ``dataset.nlvr_dataset.NLVRShardSample`` (two images, members ``left.jpg``
and ``right.jpg``), ``dataset.vqa_dataset.VQAShardSample`` and ``dataset.grounding.GroundingShardSample``.

**The stream.** Each loader worker of each rank reads its own stream, built with webdataset's ``DataPipeline``:
``ResampledShards`` (shards drawn at random *with replacement*) -> ``tarfile_to_samples`` -> ``shuffle`` (a buffer
of ``shuffle_buffer`` samples, filled completely before the first one leaves) -> decode + transform ->
``with_epoch(n)``. There is no split of the shard list: ranks and workers are kept apart by their random streams,
every one of which is seeded from ``(seed, epoch, rank, world size, worker, number of workers)``. Over an epoch a
sample may therefore be seen twice or not at all (resampling); over many epochs every shard is read equally often
on average. ``resampled=False`` instead splits the shard list (``shards[rank::world][worker::workers]``, in an
order shuffled per epoch) and reads each shard of the share once: each sample at most once per epoch, but ranks
may run dry at different steps, so it is for one-pass reading in a single process (inspection, tests), not for
DDP training.

**Epoch length.** ``epoch_samples`` is the number of samples per epoch over all ranks: each rank gets
``steps = epoch_samples // (batch_size * world_size)`` batches (``len(loader)``), spread over its loader workers
batch by batch (worker ``w`` makes batches ``w, w + W, w + 2W, ...``, the order in which PyTorch's DataLoader
collects them), so each worker yields whole batches and every rank yields exactly ``steps`` batches.

**Randomness and reproducibility.** Every sample is made under its own random stream (torch's CPU generator and
Python's ``random`` seeded from the stream key and the sample's position in its worker's stream; the previous
states are restored afterwards, so the model's RNG is never touched, also with ``num_workers: 0``): crop, flip,
RandAugment and the caption choice are a function of ``(seed, epoch, rank, world size, worker, number of
workers, position)``. Two runs with the same seed, world size, ``num_workers``, ``batch_size``,
``epoch_samples``, ``shuffle_buffer`` and shards see the same batches in the same order. Changing the number of
workers or ranks gives a different (equally valid) stream.

**Epochs reach the workers.** ``set_epoch`` and ``set_start`` write into a small shared-memory tensor that the
worker processes share with the main process, so they work with persistent workers too (a persistent worker
keeps its own copy of the data set, which only shared memory reaches), as well as with non-persistent ones and
with ``num_workers: 0``. The values are read when the epoch's iterator is created (``iter(loader)``).

**Resume inside an epoch.** ``set_start(n)`` (``n`` = samples of this rank already done, a multiple of
``batch_size``; the engine passes ``start_step * batch_size``) makes the epoch's stream start over from its
beginning and *skip* the first ``n // batch_size`` batches: each worker drops the samples of its skipped batches
after the shuffle buffer and before decoding (their tar bytes are read, nothing is decoded or augmented), so the
rest of the epoch is exactly what an uninterrupted run would have seen, with the same augmentations, provided the
world size, ``num_workers``, ``batch_size``, ``epoch_samples``, ``shuffle_buffer``, seed and shards are the same.
Exception: a sample whose image fails to decode inside the skipped part is counted as a sample there (it is not
decoded), so each such sample shifts that worker's remaining stream by one; ``make_shards`` writes only images that
decode, so this needs a shard damaged after it was written. The skip costs the time to read the skipped bytes
(about ``n * mean sample size`` per rank) but no decoding. With a different world size or number of workers the
resumed epoch is a different stream (skipping the same number of batches, so the epoch still has ``steps``
batches); samples may then repeat within that epoch. The offset holds until the next ``set_epoch``, which resets
it to 0 (the engine calls ``set_epoch`` first, then ``set_start``, at the start of every epoch).

**Bad images.** A sample whose image fails to decode (:class:`dataset.images.BadImageError`) is dropped and the
next one is used; its description (``shard:key (original path)``; ``shard:key.left.jpg (path)`` for an image of
a pair, whose other image is dropped with it) goes into the next sample's ``bad_images`` (``on_bad_image: skip``
behaviour; the epoch keeps its length). A stream with 1000 bad images in a row stops with an error. A sample
without an image member the task needs (``jpg``/``jpeg``/``png``/``webp``; ``left.jpg`` ... for NLVR2) or
without a json key it needs (pre-training: ``json``'s ``caption``, else ``txt``, as ``img2dataset`` writes) is
a ``ValueError`` naming the shard, the key and what is missing: the shards were written for another task (or by
another tool). A torn or unreadable shard (truncated by a failed copy, a filesystem error) is passed over with the
samples read before the damage, but the one being assembled when it broke (:class:`BrokenShards`): a warning names
it, and so does the next sample's ``bad_images``; 50 such shards in a row without a sample stop the stream with an
error naming them.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import random
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, IterableDataset

from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, load_rgb
from dataset.sampling import SeededRNG
from dataset.text import pre_caption
from utils import distributed as du

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_BAD_IN_A_ROW = 1000
MAX_BROKEN_SHARDS_IN_A_ROW = 50  # torn or unreadable shards without a sample in between: the stream stops


class BrokenShards:
    """Torn or unreadable shards met by one stream: each is passed over (see :func:`_shard_samples` for what of it is
    kept) and reported, once per stream in the log and every time in the next sample's ``bad_images``; too many in a
    row without a sample (lost or overwritten files) stop the stream with an error naming them."""

    def __init__(self, limit: int = MAX_BROKEN_SHARDS_IN_A_ROW):
        self.limit, self.in_a_row, self.pending, self.seen = limit, 0, [], set()
        self.recent: List[str] = []

    def report(self, url: Any, error: BaseException) -> bool:
        reason = (str(error.args[0]) if error.args else type(error).__name__).split(" @ ")[0][:200]
        what = f"{url}: shard passed over ({type(error).__name__}: {reason})"
        self.in_a_row += 1
        self.recent = (self.recent + [what])[-3:]
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.in_a_row} shards in a row could not be read, the last: {'; '.join(self.recent)}. "
                               "Check train_shards (the paths, and that every node sees the files)") from error
        if url not in self.seen:
            self.seen.add(url)
            log.warning("%s (pid %d)", what, os.getpid())
        self.pending.append(what)
        return True  # go on with the next shard

    def sample_read(self) -> None:
        self.in_a_row = 0

    def take(self) -> List[str]:
        out, self.pending = self.pending, []
        return out


def _shard_samples(src: Iterable[Dict[str, Any]], broken: BrokenShards) -> Iterator[Dict[str, Any]]:
    """webdataset's ``tarfile_to_samples``, shard by shard: a shard that cannot be opened, or whose tar stream breaks
    (truncated, corrupt), ends with the samples read before the damage but the one being assembled when it broke,
    which may lack a member (with webdataset's own error handling it would be merged into the next shard's stream),
    and is reported to ``broken``. The stream is seeded, so a resumed epoch meets the damage where the uninterrupted
    one did."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator, url_opener

    for source in url_opener(src, handler=lambda e: broken.report(e.args[-1] if e.args else "?", e)):
        url = source["url"]

        def files(stream=source["stream"], url=url):
            for f in tar_file_iterator(stream):
                f["__url__"] = url
                yield f

        try:
            for sample in group_by_keys(files()):
                broken.sample_read()
                yield sample
        except Exception as e:  # noqa: BLE001 (tarfile.ReadError, OSError, zlib errors, ...)
            broken.report(url, e)
        finally:
            close = getattr(source["stream"], "close", None)
            if close is not None:
                close()


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (stable across processes and Python versions, unlike ``hash``)."""
    return _seed_of(":".join(map(str, parts)))


def _seed_of(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def expand_urls(urls: Union[str, Sequence[str]]) -> List[str]:
    """A brace pattern (``shards/pt-{000000..000099}.tar``), several joined by ``::``, or a list of them -> the
    list of shard paths / URLs."""
    from webdataset.shardlists import expand_urls as wds_expand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: List[str] = []
    for u in items:
        if not isinstance(u, str) or not u:
            raise ValueError(f"shard URLs must be non-empty strings, got {u!r}")
        out.extend(wds_expand(u))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


def image_index(image_id: Any) -> int:
    """An image id as a non-negative int: an int stays itself; anything else (``"coco_123"``) maps to a stable 62-bit
    hash of its JSON text, equal for equal ids in every process (only equality matters: same image = positive)."""
    if isinstance(image_id, int) and not isinstance(image_id, bool) and image_id >= 0:
        return image_id
    digest = hashlib.blake2b(json.dumps(image_id, sort_keys=True).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and url != "-"


def _worker() -> Tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _batches_of_worker(steps: int, worker: int, workers: int) -> int:
    """Batches ``worker`` makes when ``workers`` share ``steps`` batches round-robin (batch j by worker j % W)."""
    return steps // workers + (1 if worker < steps % workers else 0)


@functools.lru_cache(maxsize=None)
def image_members(name: str) -> Tuple[str, ...]:
    """The member names an image called ``name`` may have in a shard: ``""`` -> ``jpg``, ``jpeg``, ``png``,
    ``webp`` (one image per sample); ``"left"`` -> ``left.jpg``, ``left.jpeg``, ... (several)."""
    return tuple(f"{name}.{ext}" if name else ext for ext in IMAGE_KEYS)


class ShardSample:
    """A task's half of :class:`ShardDataset`: how one decoded shard record becomes the sample the task's
    map-style data set yields (and its collator takes). Subclasses set:

    * ``task``: the name ``tools.make_shards --task`` knows these shards by (for error messages);
    * ``keys``: the json keys every record needs (a missing one is a ``ValueError``: shards of another task);
    * ``images``: one name per image, in order (``""``: the plain ``jpg``/... member; see :func:`image_members`);

    and implement ``__call__(meta, images, where)``: ``meta`` is the json member (checked by :meth:`check`),
    ``images`` the decoded PIL images, ``where`` ``shard:key (path)`` for messages. It returns the sample without
    ``bad_images`` (the stream adds it) and runs under the sample's own random stream (module docstring), so the
    transform and any random choice are reproducible. It is called in the loader workers: keep it picklable.
    """

    task: str = "pretrain"
    keys: Tuple[str, ...] = ()
    images: Tuple[str, ...] = ("",)

    def check(self, meta: Dict[str, Any], raw: Dict[str, Any], where: str) -> Dict[str, Any]:
        """The record's metadata, checked before anything is decoded (``raw``: the tar sample's members)."""
        missing = [k for k in self.keys if k not in meta]
        if missing:
            raise ValueError(f"{where}: no {', '.join(map(repr, missing))} in the json member (keys: {sorted(meta)}; "
                             f"members: {_members(raw)}): not shards of {self.task} records (write them with "
                             f"python -m tools.make_shards --task {self.task})")
        return meta

    def __call__(self, meta: Dict[str, Any], images: List[Any], where: str) -> Dict[str, Any]:
        raise NotImplementedError


class PretrainSample(ShardSample):
    """Pre-training (and retrieval) samples: ``{'image', 'caption', ('idx')}`` as
    :class:`dataset.caption_dataset.PretrainDataset` (``caption``: ``pre_caption`` of the json's ``caption``, one
    drawn at random from a list, else of the ``txt`` member); with ``id_key``, ``idx`` is
    :func:`image_index` of that json key (e.g. ``image_id`` of retrieval records), so that every caption of an
    image is a positive of the others."""

    def __init__(self, transform: Callable, max_words: int, id_key: Optional[str] = None):
        self.transform, self.max_words, self.id_key = transform, max_words, id_key

    def check(self, meta: Dict[str, Any], raw: Dict[str, Any], where: str) -> Dict[str, Any]:
        caption = meta.get("caption")
        if caption is None and "txt" in raw:
            caption = raw["txt"].decode("utf-8")
        if not (isinstance(caption, str) or (isinstance(caption, list) and caption
                                             and all(isinstance(c, str) for c in caption))):
            raise ValueError(f"{where}: no caption (a string or a non-empty list in json 'caption', or a txt member)")
        return dict(meta, caption=caption)

    def __call__(self, meta: Dict[str, Any], images: List[Any], where: str) -> Dict[str, Any]:
        caption = meta["caption"]
        if isinstance(caption, list):
            caption = random.choice(caption)  # before the transform: the random stream's order of old
        sample = {"image": self.transform(images[0]), "caption": pre_caption(caption, self.max_words)}
        if self.id_key is not None:
            if self.id_key not in meta:
                raise ValueError(f"{where}: no '{self.id_key}' in the json member (the image id of every "
                                 "sample is needed here: write the shards from records that have it)")
            sample["idx"] = image_index(meta[self.id_key])
        return sample


def _members(raw: Dict[str, Any]) -> List[str]:
    return sorted(k for k in raw if not k.startswith("__"))


class ShardDataset(IterableDataset):
    """A task's training samples streamed from tar shards (see the module docstring for the stream, the epoch,
    seeding and resume).

    Args:
        urls: a brace pattern (``shards/pt-{000000..000099}.tar``), several joined by ``::``, or a list of them.
            Local paths are checked to exist.
        transform: the image transform of pre-training samples (e.g. ``train_transform(image_res, augment)``);
            None when ``sample`` is given.
        max_words: ``pre_caption``'s word limit of pre-training samples; None when ``sample`` is given.
        epoch_samples: samples per epoch over all ranks (``train_samples_per_epoch``).
        shuffle_buffer: samples in each worker's shuffle buffer (raw bytes, before decoding).
        seed: the run's seed.
        batch_size: the per-rank batch of the loader that will batch this data set (the epoch is cut into whole
            batches and spread over the workers batch by batch; ``create_shard_loader`` sets it).
        resampled: True (training): shards drawn with replacement, exactly ``len(self)`` samples per rank and epoch.
            False: one pass over this rank's and worker's share of the shard list, at most ``len(self)`` samples.
        rank, world_size: default ``utils.distributed.get_rank()`` / ``get_world_size()`` at construction.
        max_image_pixels: images with more pixels are bad (as the JSON data sets).
        id_key: the json member that identifies the sample's image (e.g. ``image_id`` of retrieval records): each
            sample then carries ``idx``, that id as an int (:func:`image_index`), so that every caption of the same
            image is a positive (retrieval fine-tuning on shards).
        sample: the task's :class:`ShardSample` (e.g. ``VEShardSample(transform, max_words)``), which brings its
            own transform; default ``PretrainSample(transform, max_words, id_key)``.
    """

    def __init__(self, urls: Union[str, Sequence[str]], transform: Optional[Callable], max_words: Optional[int],
                 epoch_samples: int, shuffle_buffer: int = 1000, seed: int = 0, *, batch_size: int = 1,
                 resampled: bool = True, rank: Optional[int] = None, world_size: Optional[int] = None,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, id_key: Optional[str] = None,
                 sample: Optional[ShardSample] = None):
        super().__init__()
        if sample is None:
            if transform is None or max_words is None:
                raise ValueError("ShardDataset needs transform and max_words (pre-training samples) or a sample maker")
            sample = PretrainSample(transform, max_words, id_key)
        elif transform is not None or max_words is not None or id_key is not None:
            raise ValueError(f"give either transform / max_words / id_key (pre-training samples) or sample, not both "
                             f"(sample: {type(sample).__name__}, which has its own transform)")
        self.sample = sample
        self.urls = expand_urls(urls)
        missing = [u for u in self.urls if _is_local(u) and not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.urls)} shard(s) do not exist, e.g. "
                                    + ", ".join(missing[:3]))
        self.rank = du.get_rank() if rank is None else rank
        self.world_size = du.get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if batch_size < 1 or shuffle_buffer < 0:
            raise ValueError(f"batch_size must be >= 1 and shuffle_buffer >= 0, got {batch_size}, {shuffle_buffer}")
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.epoch_samples = epoch_samples
        self.steps = epoch_samples // (batch_size * self.world_size)
        if self.steps < 1:
            raise ValueError(f"train_samples_per_epoch {epoch_samples} gives no whole batch per rank (batch "
                             f"{batch_size} x {self.world_size} ranks)")
        self.resampled = resampled
        self.max_image_pixels = max_image_pixels
        # [epoch, start batch]: shared memory, so that persistent loader workers see set_epoch / set_start
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()

    # ------------------------------------------------------------------------------------------------ epoch control
    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def start_batches(self) -> int:
        return int(self._state[1])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's streams; resets the start offset to 0."""
        self._state[0] = int(epoch)
        self._state[1] = 0

    def set_start(self, num_samples: int) -> None:
        """Skip this rank's first ``num_samples`` samples (a multiple of ``batch_size``) of the current epoch."""
        if num_samples % self.batch_size or not 0 <= num_samples <= self.steps * self.batch_size:
            raise ValueError(f"start offset {num_samples} is not a whole number of batches of {self.batch_size} "
                             f"within this rank's {self.steps * self.batch_size} samples")
        self._state[1] = num_samples // self.batch_size

    def __len__(self) -> int:
        """This rank's samples in the current epoch from the start offset on (``steps * batch_size`` without one)."""
        return (self.steps - self.start_batches) * self.batch_size

    # ------------------------------------------------------------------------------------------------ the stream
    def stream_key(self, epoch: int, worker: int, workers: int) -> Tuple[int, ...]:
        return (self.seed, epoch, self.rank, self.world_size, worker, workers)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        # Not a generator function: the epoch and offset are read now, when the loader creates its iterator.
        epoch, start = self.epoch, self.start_batches
        physical, workers = _worker()
        # The DataLoader takes batches round-robin starting at worker 0, so after a resume at batch `start` the
        # physical worker p makes batches start + p, start + p + W, ...: those of logical worker (p + start) % W,
        # whose stream (seeds included) it therefore reads.
        worker = (physical + start) % workers
        key = self.stream_key(epoch, worker, workers)
        batches = _batches_of_worker(self.steps, worker, workers)
        skipped = _batches_of_worker(start, worker, workers)  # batches j < start with j % W == worker
        count = (batches - skipped) * self.batch_size
        if count <= 0:
            return iter(())
        return self._pipeline(key, worker, workers, skipped * self.batch_size, count)

    def _pipeline(self, key: Tuple[int, ...], worker: int, workers: int, skip: int, count: int):
        import webdataset as wds

        if self.resampled:
            shards = wds.ResampledShards(self.urls, seed=0, worker_seed=lambda: stream_seed("shards", *key),
                                         deterministic=True)
        else:
            share = self.urls[self.rank::self.world_size][worker::workers]
            if not share:
                return iter(())
            shards = wds.SimpleShardList(share, seed=stream_seed("shard-order", *key))
        broken = BrokenShards()
        stages: List[Any] = [shards, functools.partial(_shard_samples, broken=broken)]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                      seed=stream_seed("shuffle", *key)))
        stages.append(lambda src: self._decode(src, key, skip, broken))
        pipeline = wds.DataPipeline(*stages)
        if self.resampled:
            return iter(pipeline.with_epoch(count))  # count > 0 here: with_epoch(0) would never end
        return iter(wds.DataPipeline(pipeline, wds.slice(count)))

    def _decode(self, src: Iterable[Dict[str, Any]], key: Tuple[int, ...], skip: int,
                broken: BrokenShards) -> Iterator[Dict[str, Any]]:
        bad: List[str] = []
        bad_in_a_row = 0
        seed_prefix = ":".join(map(str, ("sample", *key))) + ":"  # stream_seed("sample", *key, position)
        for position, raw in enumerate(src):
            if position < skip:
                continue  # resumed epoch: skipped without decoding (module docstring)
            meta, members, where = self._parse(raw)
            with SeededRNG(_seed_of(seed_prefix + str(position))):
                sample = None
                images = []
                for i, (member, data) in enumerate(members):
                    try:
                        images.append(load_rgb(io.BytesIO(data), self.max_image_pixels))
                    except BadImageError as e:
                        bad.append(f"{self._image_where(where, meta, i, member)}: {e.reason}"
                                   + (f" ({e.detail})" if e.detail else ""))
                        bad_in_a_row += 1
                        if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                            raise RuntimeError(f"{bad_in_a_row} bad images in a row in the shard stream, the last "
                                               f"{bad[-1]}; check the shards ({self.urls[0]}, ...)") from e
                        break  # the whole record is dropped (both images of a pair)
                else:
                    sample = self.sample(meta, images, where)
            if sample is None:
                continue
            sample["bad_images"] = bad + broken.take()
            bad, bad_in_a_row = [], 0
            yield sample  # outside the seeded block: the consumer runs under its own random state

    def _image_where(self, where: str, meta: Dict[str, Any], i: int, member: str) -> str:
        """``where`` of one image: the record's for a single image; ``shard:key.member (path)`` for several."""
        if len(self.sample.images) == 1:
            return where
        paths = meta.get("image_paths")
        ok = isinstance(paths, list) and len(paths) == len(self.sample.images)
        return f"{where}.{member}" + (f" ({paths[i]})" if ok else "")

    def _parse(self, raw: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Tuple[str, bytes]], str]:
        """``(json metadata checked by the task, [(member, image bytes), ...], description for messages)`` of a raw
        tar sample."""
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        meta: Dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError as e:
                raise ValueError(f"{where}: the json member is not valid JSON ({e})") from e
            if not isinstance(meta, dict):
                raise ValueError(f"{where}: the json member is not an object")
        if "image_path" in meta or "image" in meta:
            where += f" ({meta.get('image_path', meta.get('image'))})"
        meta = self.sample.check(meta, raw, where)
        members = []
        for name in self.sample.images:
            names = image_members(name)
            for member in names:
                if member in raw:
                    break
            else:
                raise ValueError(f"{where}: no image member ({'/'.join(names)}); members: {_members(raw)}"
                                 + ("" if self.sample.task == "pretrain" else
                                    f" (python -m tools.make_shards --task {self.sample.task} writes them)"))
            members.append((member, raw[member]))
        return meta, members, where


class ShardSampler:
    """What the engine calls a sampler for a shard loader: ``set_epoch`` / ``set_start`` forward to the
    :class:`ShardDataset`; ``len()`` is its current length in samples."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def set_start(self, num_samples: int) -> None:
        self.dataset.set_start(num_samples)

    def __len__(self) -> int:
        return len(self.dataset)


def create_shard_loader(urls: Union[str, Sequence[str]], transform: Optional[Callable], max_words: Optional[int],
                        batch_size: int, num_workers: int, seed: int, epoch_samples: int,
                        collate_fn: Optional[Callable] = None,
                        shuffle_buffer: int = 1000, *, persistent_workers: bool = True, prefetch_factor: int = 2,
                        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, id_key: Optional[str] = None,
                        sample: Optional[ShardSample] = None) -> Tuple[DataLoader, ShardSampler]:
    """The training loader over shards: ``(loader, sampler)`` with ``len(loader)`` = ``epoch_samples //
    (batch_size * world_size)`` batches per rank, every one of ``batch_size`` samples; ``sampler.set_epoch(e)``
    every epoch (the engine does) and ``sampler.set_start(n)`` to resume inside one. Pre-training samples from
    ``transform``, ``max_words`` (and ``id_key``), or the task's ``sample`` (then ``transform`` and ``max_words``
    are None), as :class:`ShardDataset`. Raises ``ValueError`` when ``epoch_samples`` gives no whole batch per
    rank, ``FileNotFoundError`` for a missing local shard."""
    from dataset.sampling import ignore_stop_signals, shutdown_workers_at_exit

    dataset = ShardDataset(urls, transform, max_words, epoch_samples, shuffle_buffer, seed, batch_size=batch_size,
                           max_image_pixels=max_image_pixels, id_key=id_key, sample=sample)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                        pin_memory=torch.cuda.is_available(), drop_last=True,
                        generator=torch.Generator().manual_seed(seed),  # never draws from the global RNG
                        worker_init_fn=ignore_stop_signals if num_workers else None,
                        persistent_workers=persistent_workers and num_workers > 0,
                        prefetch_factor=prefetch_factor if num_workers else None)
    if num_workers and persistent_workers:
        shutdown_workers_at_exit(loader)
    return loader, ShardSampler(dataset)
