"""Datasets, the global-batch sampler and collation.

Training sets yield (image, caption, label) with label -1 when unknown; evaluation sets yield
(image, label) with labels as indices into the ID class list. Every per-sample random choice (the
caption template, the training augmentation) is seeded by (seed, epoch, index), so a run gives
the same batches whatever the worker count, the rank layout or a resume point."""
from __future__ import annotations

import collections
import csv
import dataclasses
import itertools
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import templates as templates_mod

log = logging.getLogger("calrft.data")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# How far a training set looks past an unreadable image for a readable one (keeps batches full,
# which a process-group loss needs: every rank must contribute the same number of rows).
MAX_SUBSTITUTIONS = 16


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def load_image(path: str):
    from PIL import Image
    with Image.open(path) as img:
        return img.convert("RGB")


def seeded_transform(transform, image, seed: int):
    """Apply a (possibly random) torchvision transform with its randomness fixed by `seed`,
    without disturbing the caller's global RNG."""
    if transform is None:
        return image
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def class_name_from_folder(folder: str) -> str:
    return folder.replace("_", " ").strip()


def normalise_name(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


@dataclass
class Skipped:
    """An item that could not be read: reported by the collate function, never trained on."""
    path: str
    reason: str


class DataStreamError(RuntimeError):
    """Training data that cannot make progress: no readable sample in a full pass over a worker's
    shards, too many unreadable samples (UnreadableMonitor), a data-loader worker that died or
    stalled. The message is one line naming the files and counts (`calrft train` exits 1 with it).
    A DataLoader re-raises a worker's exception as type(message + traceback): the constructor
    keeps the original line only."""

    def __init__(self, message: str = ""):
        text = str(message)
        if "Original Traceback" in text:
            text = text.rsplit(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(" ".join(text.split()))


def source_of(path: str) -> str:
    """The file a Skipped item came from: a shard for "url#key", else the image path itself."""
    return path.rsplit("#", 1)[0] if "#" in path else path


def count_by_source(skipped, limit: int = 3) -> str:
    """ "a.tar (40), b.tar (5), ... (7 files)": where unreadable samples came from, most first."""
    counts = collections.Counter(source_of(s.path) for s in skipped)
    shown = ", ".join(f"{name} ({n})" for name, n in counts.most_common(limit))
    return shown + (f", ... ({len(counts)} files)" if len(counts) > limit else "")


class UnreadableMonitor:
    """Stops a run whose training data is mostly unreadable. `observe(read, skipped)` takes a
    batch: the readable samples read for it (a stream counts those its shuffle buffer took in)
    and the Skipped items passed over. It logs each unreadable file once, and raises
    DataStreamError naming the files and counts when, once this rank has read `window` samples,
    more than `max_fraction` of the samples of its last batches covering `window` samples (the
    fewest that do) were unreadable. max_fraction 1 never stops."""

    def __init__(self, max_fraction: float = 0.5, window: int = 1000, what: str = "train data"):
        self.max_fraction, self.window, self.what = max_fraction, window, what
        self.batches = collections.deque()     # (samples read, Skipped items) per batch
        self.seen: set = set()
        self.total_read = self.total_unreadable = 0

    def observe(self, read: int, skipped) -> None:
        report_skipped(skipped, self.seen)
        self.batches.append((read + len(skipped), list(skipped)))
        self.total_read += read + len(skipped)
        self.total_unreadable += len(skipped)
        covered = sum(n for n, _ in self.batches)
        while covered - self.batches[0][0] >= self.window:
            covered -= self.batches.popleft()[0]
        bad = [s for _, batch in self.batches for s in batch]
        if covered >= self.window and len(bad) > self.max_fraction * covered:
            raise DataStreamError(
                f"{self.what}: {len(bad)} of the last {covered} samples read were unreadable, more "
                f"than --max-unreadable {self.max_fraction:g} over --unreadable-window "
                f"{self.window} ({self.total_unreadable} of {self.total_read} in all); from "
                f"{count_by_source(bad)}; first: {bad[0].path}: {bad[0].reason}")


_LOADER_FAILURE = re.compile(r"DataLoader (timed out after|worker \(pids?(\(s\))? [^)]*\) "
                             r"(exited unexpectedly|is killed by signal))")


def loader_failure(exc: BaseException, timeout: float, what: str = "train data") -> DataStreamError | None:
    """A DataLoader's own error for a worker that died or stalled past `timeout` seconds, as a
    one-line DataStreamError naming the setting; None for any other exception."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, DataStreamError):
        return None
    text = " ".join(str(exc).split())
    if not _LOADER_FAILURE.search(text):
        return None
    if "timed out" in text:
        return DataStreamError(f"{what}: no batch from the data-loader workers in {timeout:g} s "
                               f"(--data-timeout): a worker stalled (a hung read?); {text}")
    return DataStreamError(f"{what}: a data-loader worker died ({text}); the run cannot go on "
                           f"without its share of the data")


class _ReadableTrainSet(Dataset):
    """Shared logic: substitute the next readable item for an unreadable one, and remember it."""
    seed = 0

    def __len__(self):
        return len(self.paths)

    def _item(self, index: int, epoch: int):
        raise NotImplementedError

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        skipped = []
        for offset in range(MAX_SUBSTITUTIONS):
            j = (index + offset) % len(self)
            try:
                image, caption, label = self._item(j, epoch)
                return image, caption, label, skipped
            except Exception as exc:  # PIL raises many types for corrupt files
                skipped.append(Skipped(self.paths[j], f"{type(exc).__name__}: {exc}"))
        raise DataStreamError(f"train data: {MAX_SUBSTITUTIONS} unreadable images in a row from "
                              f"{self.paths[index]}; first: {skipped[0].reason}")


class CsvCaptions(_ReadableTrainSet):
    """CSV/TSV of image path and caption (the FLYP/CaRot format: columns filepath, title,
    tab-separated). Relative paths are resolved against the CSV's folder. An optional label
    column gives class indices (used by --method ft and supervised targets)."""

    def __init__(self, path, transform=None, image_key="filepath", caption_key="title",
                 label_key=None, sep=None, seed=0):
        if not os.path.isfile(path):
            raise ValueError(f"path: no such CSV file {path!r}")
        with open(path, newline="") as f:
            head = f.readline()
            sep = sep or ("\t" if "\t" in head else ",")
            f.seek(0)
            rows = list(csv.DictReader(f, delimiter=sep))
        if not rows:
            raise ValueError(f"path: {path!r} has no rows")
        for key in (image_key, caption_key) + ((label_key,) if label_key else ()):
            if key not in rows[0]:
                raise ValueError(f"{path}: missing column {key!r} (have {list(rows[0])})")
        base = os.path.dirname(os.path.abspath(path))
        self.paths = [os.path.join(base, r[image_key]) for r in rows]
        self.captions = [r[caption_key] for r in rows]
        self.labels = [int(r[label_key]) for r in rows] if label_key else [-1] * len(rows)
        self.transform, self.seed = transform, seed

    def _item(self, index, epoch):
        image = load_image(self.paths[index])
        image = seeded_transform(self.transform, image, sample_seed(self.seed, epoch, index))
        return image, self.captions[index], self.labels[index]


def class_folders(root: str) -> list[str]:
    """The class folder names of an ImageFolder-style tree, sorted (without walking the images)."""
    if not os.path.isdir(root):
        raise ValueError(f"root: no such folder {root!r}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise ValueError(f"root: {root!r} has no class folders")
    return classes


def scan_image_folder(root: str):
    """(class folder names sorted, [(path, class position)]) of an ImageFolder-style tree."""
    classes = class_folders(root)
    items = []
    for position, folder in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, folder))):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(dirpath, name), position))
    return classes, items


class ImageFolderCaptions(_ReadableTrainSet):
    """ImageFolder tree; captions = a prompt template (chosen per sample and epoch) filled with
    the class name (folder name, underscores as spaces)."""

    def __init__(self, root, transform=None, templates="openai", seed=0):
        folders, items = scan_image_folder(root)
        self.classnames = [class_name_from_folder(c) for c in folders]
        self.paths = [p for p, _ in items]
        self.labels = [c for _, c in items]
        self.templates = templates_mod.get(templates)
        self.transform, self.seed = transform, seed

    def _item(self, index, epoch):
        s = sample_seed(self.seed, epoch, index)
        template = self.templates[s % len(self.templates)]
        image = seeded_transform(self.transform, load_image(self.paths[index]), s)
        label = self.labels[index]
        return image, template.format(self.classnames[label]), label


def map_classes(names, id_classnames, what: str, shown=None) -> list[int]:
    """ID class index of each of an evaluation set's class names, matched by normalised name (an
    OOD set may cover a subset of the ID classes); ValueError naming those that match none."""
    lookup = {normalise_name(c): i for i, c in enumerate(id_classnames)}
    shown = names if shown is None else shown
    missing = [s for n, s in zip(names, shown) if normalise_name(n) not in lookup]
    if missing:
        raise ValueError(f"{what} {missing[:5]} match no ID class name")
    return [lookup[normalise_name(n)] for n in names]


class ImageFolderEval(Dataset):
    """An evaluation tree whose class folders map by name onto (a subset of) the ID classes, as
    ImageNet-R/-A use 200 of ImageNet's 1000. `class_indices` lists the ID classes present, in
    the order of this set's folders; labels are ID class indices."""

    def __init__(self, root, transform, id_classnames):
        _, items = scan_image_folder(root)
        self.class_indices = set_class_indices(root, id_classnames)
        self.paths = [p for p, _ in items]
        self.labels = [self.class_indices[c] for _, c in items]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = self.transform(load_image(self.paths[index]))
        except Exception as exc:
            return Skipped(self.paths[index], f"{type(exc).__name__}: {exc}")
        return image, self.labels[index]


class TensorCaptions(Dataset):
    """In-memory images [N, 3, H, W] (already preprocessed) with class labels; captions from
    templates, chosen per sample and epoch (the embedded benchmark uses it)."""

    def __init__(self, images, labels, classnames, templates="short", seed=0):
        self.images, self.labels = images, labels.long()
        self.classnames, self.templates = list(classnames), templates_mod.get(templates)
        self.seed = seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        s = sample_seed(self.seed, epoch, index)
        label = int(self.labels[index])
        caption = self.templates[s % len(self.templates)].format(self.classnames[label])
        return self.images[index], caption, label, []


class TensorEval(Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels.long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


@dataclass
class EvalSet:
    """A named evaluation set; class_indices: the ID classes it covers (None = all)."""
    name: str
    dataset: Dataset
    class_indices: list | None = None
    skipped: list = field(default_factory=list)


class GlobalBatchSampler:
    """Yields, for each step, this rank's share of a global batch.

    Epoch e uses a permutation seeded by (seed, e); global batch t is perm[t*B:(t+1)*B] and rank r
    takes rows [r*b:(r+1)*b] of it (b = B / world). So a world of k processes sees exactly the rows
    - in the same order, once gathered - of one process with batch B, and resuming at a step skips
    nothing and repeats nothing. Incomplete last batches are dropped."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0, epoch=0, start_step=0):
        if global_batch % world:
            raise ValueError(f"global_batch: {global_batch} is not divisible by the world size {world}")
        if n < global_batch:
            raise ValueError(f"global_batch: {global_batch} exceeds the dataset size {n}")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.local = global_batch // world

    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self):
        return self.steps_per_epoch() - self.start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 % 2**31))
        perm = torch.randperm(self.n, generator=g).tolist()
        for t in range(self.start_step, self.steps_per_epoch()):
            lo = t * self.global_batch + self.rank * self.local
            yield [(i, self.epoch) for i in perm[lo:lo + self.local]]


class CaptionCollate:
    """Stack images, tokenise captions; pass along what was skipped."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        images = torch.stack([it[0] for it in items])
        tokens = self.tokenizer([it[1] for it in items])
        labels = torch.tensor([it[2] for it in items])
        skipped = [s for it in items for s in it[3]]
        # readable samples read for the batch: a stream's items say how many its shuffle buffer
        # took in since the last one (UnreadableMonitor); an indexed set read each item once
        read = sum(it[4] if len(it) > 4 else 1 for it in items)
        return {"images": images, "texts": tokens, "labels": labels, "skipped": skipped, "read": read}


def eval_collate(items):
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    images = torch.stack([it[0] for it in good]) if good else torch.empty(0)
    labels = torch.tensor([it[1] for it in good], dtype=torch.long)
    return {"images": images, "labels": labels, "skipped": skipped}


def train_loader(dataset, tokenizer, sampler, workers=2, timeout=0.0):
    """Batches of `sampler`'s index lists; `timeout` (seconds, 0 = none) bounds each wait for a
    batch from the workers (a DataLoader enforces it only with workers)."""
    # a private generator: a DataLoader draws its workers' base seed from the global generator
    # otherwise, so a loader started at a resume point would shift the model's random stream
    # (dropout) against an uninterrupted run; the items' own randomness is seeded per sample
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      collate_fn=CaptionCollate(tokenizer), persistent_workers=False,
                      timeout=timeout if workers else 0,
                      generator=torch.Generator().manual_seed(sampler.seed + sampler.epoch))


def eval_loader(dataset, batch_size=256, workers=2, indices=None, timeout=0.0):
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=eval_collate, timeout=timeout if workers else 0)


def report_skipped(skipped, seen: set | None = None, logger=log):
    """Log each unreadable file once."""
    for s in skipped:
        if seen is not None:
            if s.path in seen:
                continue
            seen.add(s.path)
        logger.warning("skipped unreadable image %s (%s)", s.path, s.reason)


# ---- WebDataset tar shards (streamed training input) ---------------------------------------------

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")   # what img2dataset / open_clip's tools write


def _wds(what: str = "train_data"):
    try:
        import webdataset
    except ImportError:
        raise ValueError(f"{what}: WebDataset shards need the webdataset package (pip install "
                         f"'calrft-kernels[webdataset]')") from None
    return webdataset


class WebDatasetCaptions(torch.utils.data.IterableDataset):
    """Training pairs streamed from WebDataset tar shards: one sample per key, the image under
    jpg / jpeg / png / webp, the caption under txt, an optional integer label under cls (as
    img2dataset and open_clip write them).

    Each epoch shuffles the shard list by (seed, epoch); rank r of `world` takes shards r, r +
    world, ... and each loader worker a disjoint part of those, so ranks and workers never read the
    same sample. A rank's stream cycles through its shards, so every rank yields the same number
    of batches (a process-group loss needs that); an epoch is `steps_per_epoch` batches. Samples
    are shuffled in a seeded buffer and augmented with seeds from (seed, epoch, key), so an epoch
    is the same stream for the same rank layout and worker count (resuming skips the epoch's first
    batches). A sample that cannot be decoded, or a corrupt tar member, is skipped and reported
    (Skipped, "url#key") with the next batch; the batch is filled from the following samples.
    Items are (image, caption, label, skipped, readable samples read since the last item). A
    full pass over a worker's shards without one readable sample raises DataStreamError (the
    cycle would never yield)."""

    def __init__(self, urls, transform=None, seed=0, shuffle_buffer=256):
        wds = _wds()
        expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not expanded:
            raise ValueError(f"train_data: {urls!r} names no shards")
        missing = [u for u in expanded if "://" not in u and not os.path.isfile(u)]
        if missing:
            raise ValueError(f"train_data: no such shard {missing[0]!r} ({len(missing)} of "
                             f"{len(expanded)} missing)")
        self.urls, self.transform, self.seed = expanded, transform, seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.rank, self.world = 0, 0, 1

    def for_rank(self, epoch: int, rank: int, world: int) -> "WebDatasetCaptions":
        """This rank's stream of one epoch (a shallow copy)."""
        import copy
        part = copy.copy(self)
        part.epoch, part.rank, part.world = epoch, rank, world
        return part

    def shards(self, worker: int = 0, workers: int = 1) -> list:
        """The shards this rank's `worker` reads this epoch."""
        import random
        order = list(self.urls)
        random.Random(sample_seed(self.seed, self.epoch, 2**31 - 2)).shuffle(order)
        return order[self.rank::self.world][worker::workers]

    def _decode(self, sample):
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        where = f"{url}#{key}"
        try:
            raw = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
            if raw is None:
                raise ValueError(f"no image ({'/'.join(WDS_IMAGE_KEYS)}) in keys {sorted(sample)}")
            if "txt" not in sample:
                raise ValueError(f"no caption (txt) in keys {sorted(sample)}")
            import io

            from PIL import Image
            with Image.open(io.BytesIO(raw)) as img:
                image = img.convert("RGB")
            s = int(np.random.SeedSequence([self.seed, self.epoch, *key.encode()]).generate_state(1)[0])
            image = seeded_transform(self.transform, image, s)
            caption = sample["txt"].decode("utf-8").strip()
            label = int(sample["cls"].decode().strip()) if "cls" in sample else -1
            return image, caption, label
        except Exception as exc:  # PIL raises many types for corrupt images
            return Skipped(where, f"{type(exc).__name__}: {exc}")

    def __iter__(self):
        import random
        wds = _wds()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards(worker, workers)
        if not mine:
            raise ValueError(f"train_data: {len(self.urls)} shards cannot feed {self.world} ranks x "
                             f"{workers} loader workers; use more shards or fewer --workers")
        rng = random.Random(sample_seed(self.seed, self.epoch, 10**6 * self.rank + worker))
        errors = []

        def handler(exc):  # a corrupt tar member: count it, go on
            errors.append(Skipped("?", f"{type(exc).__name__}: {exc}"))
            return True

        def passes():
            """(item or Skipped, corrupt tar members met before it), one pass over this worker's
            shards after another (a cycle: every rank yields as many batches as the others)."""
            while True:
                readable, bad = 0, []
                for sample in wds.tarfile_samples([{"url": u} for u in mine], handler=handler):
                    item = self._decode(sample)
                    corrupt = list(errors)
                    errors.clear()
                    bad += corrupt + ([item] if isinstance(item, Skipped) else [])
                    readable += not isinstance(item, Skipped)
                    yield item, corrupt
                bad += errors
                if readable:
                    continue
                shards = f"{len(mine)} shards ({', '.join(mine[:3])}{', ...' if len(mine) > 3 else ''})"
                if not bad:
                    raise DataStreamError(f"train data: {shards} hold no samples")
                # a full pass without one readable sample: this stream can never yield a batch
                raise DataStreamError(f"train data: no readable sample in a full pass over {shards}: "
                                      f"{len(bad)} unreadable; first: {bad[0].path}: {bad[0].reason}")

        buffer, skipped, read = [], [], 0
        for item, corrupt in passes():
            skipped += corrupt
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            buffer.append(item)
            read += 1
            if len(buffer) < self.shuffle_buffer:
                continue
            image, caption, label = buffer.pop(rng.randrange(len(buffer)))
            yield image, caption, label, skipped, read
            skipped, read = [], 0


def webdataset_loader(dataset: WebDatasetCaptions, tokenizer, *, global_batch, rank=0, world=1,
                      epoch=0, start_step=0, steps_per_epoch=1, workers=2, timeout=0.0):
    """Batches of this rank's share (global_batch / world rows) of epoch `epoch`, from batch
    `start_step` to `steps_per_epoch` (earlier ones are read and dropped, so a resumed epoch
    continues the same stream); `timeout` as train_loader's."""
    if global_batch % world:
        raise ValueError(f"batch_size: {global_batch} is not divisible by the world size {world}")
    loader = DataLoader(dataset.for_rank(epoch, rank, world), batch_size=global_batch // world,
                        num_workers=workers, collate_fn=CaptionCollate(tokenizer),
                        timeout=timeout if workers else 0,
                        generator=torch.Generator().manual_seed(dataset.seed + epoch))
    return itertools.islice(loader, start_step, steps_per_epoch)


# ---- WebDataset evaluation sets (clip_benchmark's layout) ----------------------------------------
# clip_benchmark distributes classification sets (ImageNet and its shifted variants among them) as
#   root/classnames.txt, root/zeroshot_classification_templates.txt,
#   root/test/nshards.txt, root/test/0.tar, 1.tar, ...
# with one sample per key: the image under webp / png / jpg / jpeg and an integer `cls`, an index
# into classnames.txt. An evaluation set is read from an index of where each sample's members
# lie in the (uncompressed) tars, so it has a length, loads by position like an ImageFolder set,
# and splits across ranks and loader workers the same way.

SHARD_SPLIT = "test"            # clip_benchmark's split folder
SPLIT_FOLDERS = ("test", "train", "val", "validation")   # shards in one: classnames.txt above it


@dataclass(frozen=True)
class ShardSample:
    """Where one sample's image lies in its tar (offset, size), and its label in the set's own
    class list; `problem` says why it cannot be evaluated (it is then skipped and counted)."""
    url: str
    key: str
    offset: int = 0
    size: int = 0
    label: int = -1
    problem: str = ""


@dataclass(frozen=True)
class ShardIndex:
    urls: tuple
    classnames: tuple | None     # from classnames.txt (None: the labels index the ID classes)
    samples: tuple


def _natural_key(path: str):
    import re
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _tars_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted((os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar")),
                  key=_natural_key)


def is_shard_set(path: str) -> bool:
    """A shard pattern or .tar file, or a folder holding .tar shards (directly or in its test/
    folder, clip_benchmark's layout); anything else is an ImageFolder tree."""
    if path.endswith(".tar") or ("{" in path and ".tar" in path):
        return True
    return bool(_tars_in(path) or _tars_in(os.path.join(path, SHARD_SPLIT)))


def shard_urls(path: str, what: str) -> tuple[list[str], list[str]]:
    """(the shards of an evaluation set, in order; folders to look in for classnames.txt: the
    given folder, the shards' folder, and above a split folder such as test/ its dataset folder)."""
    if os.path.isdir(path):
        folder = os.path.join(path, SHARD_SPLIT) if _tars_in(os.path.join(path, SHARD_SPLIT)) else path
        nshards = os.path.join(folder, "nshards.txt")
        if os.path.isfile(nshards):
            with open(nshards) as f:
                text = f.read().strip()
            if not text.isdigit():
                raise ValueError(f"{what}: {nshards!r} does not hold a number of shards")
            urls = [os.path.join(folder, f"{k}.tar") for k in range(int(text))]
        else:
            urls = _tars_in(folder)
    else:
        urls = list(_wds(what).shardlists.expand_urls(path))
    look_in = [os.path.abspath(path)] if os.path.isdir(path) else []
    if urls:
        shard_dir = os.path.dirname(os.path.abspath(urls[0]))
        look_in.append(shard_dir)
        if os.path.basename(shard_dir) in SPLIT_FOLDERS:
            look_in.append(os.path.dirname(shard_dir))
    look_in = list(dict.fromkeys(look_in))
    if not urls:
        raise ValueError(f"{what}: {path!r} names no shards")
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise ValueError(f"{what}: evaluation reads local shard files; {remote[0]!r} is not one "
                         f"(download the set first)")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ValueError(f"{what}: no such shard {missing[0]!r} ({len(missing)} of {len(urls)} missing)")
    return urls, look_in


def _split_member_name(name: str):
    """(key, extension) as WebDataset groups tar members: the key runs to the first dot of the
    file name, extensions are compared in lower case."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _index_tar(url: str) -> list[ShardSample]:
    """One pass over a tar's headers (image data is skipped over, `cls` members are read). Members
    of one key are consecutive, as WebDataset writes and reads them. A tar that breaks off is
    indexed up to the break, and the break counts as one unreadable sample."""
    import tarfile
    samples = []

    def close(key, members, f):
        image = next((members[e] for e in WDS_IMAGE_KEYS if e in members), None)
        if image is None:
            return ShardSample(url, key, problem=f"no image ({'/'.join(WDS_IMAGE_KEYS)}) in keys "
                                                 f"{sorted(members)}")
        if "cls" not in members:
            return ShardSample(url, key, problem=f"no label (cls) in keys {sorted(members)}")
        offset, size = members["cls"]
        f.seek(offset)
        text = f.read(size).decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError:
            return ShardSample(url, key, problem=f"cls {text[:20]!r} is not an integer")
        return ShardSample(url, key, image[0], image[1], label)

    with open(url, "rb") as f:
        key, members = None, {}
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    k, ext = _split_member_name(info.name)
                    if k != key:
                        if key is not None:   # (tarfile seeks back to its next header itself)
                            samples.append(close(key, members, f))
                        key, members = k, {}
                    members[ext] = (info.offset_data, info.size)
                end = tar.offset
            if key is not None:
                samples.append(close(key, members, f))
            # tarfile ends quietly at a header it cannot parse: past the end-of-archive mark
            # there must be nothing but zero padding
            f.seek(end)
            while chunk := f.read(1 << 20):
                if chunk.count(0) != len(chunk):
                    raise tarfile.ReadError(f"unreadable data at byte {end}")
        except (tarfile.TarError, EOFError, OSError) as exc:
            where = f"after {len(samples)} samples" if samples else "at its start"
            samples.append(ShardSample(url, "?", problem=f"corrupt tar {where}: {type(exc).__name__}: {exc}"))
    return samples


_SHARD_INDEX_CACHE: dict = {}


def read_classnames(path: str, what: str) -> list[str]:
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path!r} ({exc})") from None
    if not names:
        raise ValueError(f"{what}: {path!r} holds no class names (one a line)")
    return names


def scan_shards(path: str, what: str = "ood_eval") -> ShardIndex:
    """The index of an evaluation set's shards (cached per shard file, size and time, so the
    pre-flight check and the run read the headers once)."""
    urls, look_in = shard_urls(path, what)
    names_file = next((os.path.join(d, "classnames.txt") for d in look_in
                       if os.path.isfile(os.path.join(d, "classnames.txt"))), None)
    stamp = tuple((u, os.path.getsize(u), os.stat(u).st_mtime_ns) for u in urls)
    if names_file:
        stamp += ((names_file, os.path.getsize(names_file), os.stat(names_file).st_mtime_ns),)
    if stamp not in _SHARD_INDEX_CACHE:
        samples = [s for u in urls for s in _index_tar(u)]
        classnames = tuple(read_classnames(names_file, what)) if names_file else None
        if classnames is not None:
            samples = _labels_below(samples, len(classnames), f"class names of {names_file}")
        _SHARD_INDEX_CACHE[stamp] = ShardIndex(tuple(urls), classnames, tuple(samples))
    return _SHARD_INDEX_CACHE[stamp]


def _labels_below(samples, n: int, what: str) -> list[ShardSample]:
    """The samples, those whose `cls` is not a position in a list of n classes marked unreadable."""
    return [s if s.problem or 0 <= s.label < n else
            dataclasses.replace(s, problem=f"cls {s.label} is outside the {n} {what}") for s in samples]


def decode_shard_image(sample: ShardSample):
    import io

    from PIL import Image
    with open(sample.url, "rb") as f:
        f.seek(sample.offset)
        raw = f.read(sample.size)
    with Image.open(io.BytesIO(raw)) as img:
        return img.convert("RGB")


class ShardEval(Dataset):
    """An evaluation set of WebDataset shards in clip_benchmark's layout: the same items, labels
    and class mapping as ImageFolderEval. Labels are the set's `cls` values mapped by name from its
    classnames.txt onto the ID classes (without a classnames.txt, `cls` indexes the ID classes)."""

    def __init__(self, path, transform, id_classnames, what="ood_eval"):
        samples = scan_shards(path, what).samples
        self.class_indices = set_class_indices(path, id_classnames, what)
        if self.class_indices is None:   # no classnames.txt: `cls` indexes the ID classes
            self.class_indices = list(range(len(id_classnames)))
            samples = _labels_below(samples, len(id_classnames),
                                    "ID classes (no classnames.txt beside the shards)")
        self.samples = tuple(samples)
        self.labels = [self.class_indices[s.label] if not s.problem else -1 for s in self.samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        s = self.samples[index]
        where = f"{s.url}#{s.key}"
        if s.problem:
            return Skipped(where, s.problem)
        try:
            image = self.transform(decode_shard_image(s))
        except Exception as exc:  # PIL raises many types for corrupt images
            return Skipped(where, f"{type(exc).__name__}: {exc}")
        return image, self.labels[index]


def eval_set(path, transform, id_classnames, what="ood_eval"):
    """An evaluation set from a path: WebDataset shards (is_shard_set) or an ImageFolder tree."""
    if is_shard_set(path):
        return ShardEval(path, transform, id_classnames, what)
    return ImageFolderEval(path, transform, id_classnames)


def set_class_indices(path: str, id_classnames, what: str = "ood_eval") -> list[int] | None:
    """The ID class index of each of an evaluation set's own classes (an ImageFolder's folders, a
    shard set's classnames.txt), matched by name (map_classes); None for a shard set without a
    classnames.txt (its labels index the ID classes)."""
    if is_shard_set(path):
        names = scan_shards(path, what).classnames
        if names is None:
            return None
        return map_classes(list(names), id_classnames, f"{path}: class names (classnames.txt)")
    folders = class_folders(path)
    return map_classes([class_name_from_folder(f) for f in folders], id_classnames,
                       f"{path}: class folders", folders)


def id_classnames(classnames_file=None, train_folder=None, id_eval=None) -> list[str] | None:
    """The ID class list, from the first that gives one: a class-names file (one a line), a
    training ImageFolder's folder names, the classnames.txt of an ID shard set."""
    if classnames_file:
        return read_classnames(classnames_file, "classnames")
    if train_folder:
        return [class_name_from_folder(f) for f in class_folders(train_folder)]
    if id_eval and is_shard_set(id_eval):
        names = scan_shards(id_eval, "id_eval").classnames
        return list(names) if names is not None else None
    return None
