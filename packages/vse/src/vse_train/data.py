"""Training data: the project's WebDataset shards streamed as batches.

Per data-loader worker the pipeline is an explicit list of webdataset stages::

    endless shard list (reshuffled each epoch with (seed, epoch))
    -> node + worker split of the shards          (rank r of R, worker w of W: shard i goes to r*W+w == i % (R*W))
    -> tarfile_to_samples                         (raw records, handler re-raises with the shard name)
    -> [sample-level node + worker split]         (only when there are fewer shards than R*W readers)
    -> parse the JSON (Sample), drop samples the recipe cannot use (no kept dense text),
       choose the sparse caption this pass over the shards uses (``caption_sampling``)
    -> shuffle buffer (seeded per reader)
    -> batched (raw samples, images still encoded)
    -> skip the batches a resumed run already consumed
    -> collate: decode + crop/flip + resize images (uint8), tokenize + augment the texts

Caption sampling. ``each`` (the reference, whose epoch iterates captions): pass ``p`` over the
shards gives an image with ``n`` captions its caption ``perm[p % n]``, ``perm`` a permutation
drawn per (seed, image, p // n); so every ``n`` consecutive passes use each caption exactly
once, and an epoch over captions is ``n`` passes over the images. ``random``: one caption drawn
at random per image and pass.

The stream never ends (epochs follow each other inside each worker), so the data loader's
round robin over workers is exact and the data position of a run is one number, the count
of batches consumed; a resumed run skips that many raw batches before decoding anything.
Every random choice is seeded by (seed, reader, epoch or batch index), never by the process.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from d2s.integrity import Integrity
from d2s.schema import Sample, SampleError
from vse.models import TokenAugConfig
from vse.transforms import ImageTransform, TextTokenizer

log = logging.getLogger(__name__)


def image_id_int(sample_id: str) -> int:
    """A 63-bit integer id of an image (used to mask pairs that share an image)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


@dataclass
class TextField:
    """One text tensor of a batch: which text, how long, augmented or not."""

    # "sparse" (one caption drawn per image), "dense" (a kept dense text), "sentence" (one
    # sentence of it) or "sentence_negative" (that sentence with one word changed: text_edits)
    source: str
    max_length: int
    augment: bool


class Collate:
    """A list of raw samples -> a batch dict of tensors (runs in the data-loader workers).

    ``pixels`` is uint8 [B, 3, S, S]; the trainer normalises it on its device (``ImageTransform.normalize``).
    An image that cannot be decoded raises :class:`SampleError` naming shard and key
    (``on_bad_sample="raise"``), or is dropped from the batch with a warning (``"skip"``: the
    batch is one sample shorter; the batch's ``skipped`` [1] counts the samples dropped).
    """

    def __init__(
        self,
        transform: ImageTransform,
        tokenizer: TextTokenizer,
        fields: dict[str, TextField],
        aug: TokenAugConfig,
        on_bad_sample: str = "raise",
    ):
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample: {on_bad_sample!r} is not one of ['raise', 'skip']")
        self.transform = transform
        self.tokenizer = tokenizer
        self.fields = fields
        self.aug = aug
        self.on_bad_sample = on_bad_sample

    def __call__(
        self,
        samples: list[Sample],
        seed: list[int],
        caption_index: list[int] | None = None,
        shards: list[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``caption_index[i]``: which sparse caption sample i uses (None: one drawn at random);
        ``shards[i]``: the shard sample i came from (named in errors)."""
        rng = np.random.default_rng(seed)
        names = [(shards[i] if shards else None, s.key) for i, s in enumerate(samples)]
        pixels, keep = [], []
        for i, s in enumerate(samples):
            try:
                pixels.append(self.transform.pixels_or_error(s.image, i, rng, names))
                keep.append(i)
            except SampleError as exc:
                if self.on_bad_sample == "raise":
                    raise
                log.warning("on_bad_sample=skip: dropping a training sample: %s", exc)
        if not keep:
            raise SampleError(
                f"every sample of this batch has an unreadable image (first: shard {names[0][0]}, "
                f"key {names[0][1]!r}); are the shards damaged?"
            )
        skipped = len(samples) - len(keep)
        if skipped:
            samples = [samples[i] for i in keep]
            caption_index = None if caption_index is None else [caption_index[i] for i in keep]
        batch: dict[str, torch.Tensor] = {
            "pixels": torch.from_numpy(np.stack(pixels))
            .permute(0, 3, 1, 2)
            .contiguous(),  # uint8; normalised on the device
            "image_ids": torch.tensor([image_id_int(s.id) for s in samples], dtype=torch.long),
        }
        if self.on_bad_sample == "skip":
            batch["skipped"] = torch.tensor([skipped], dtype=torch.long)
        if caption_index is None:
            caption_index = [int(rng.integers(len(s.sparse))) if s.sparse else 0 for s in samples]
        texts: dict[str, list[str]] = {
            "sparse": [s.sparse[j] if s.sparse else "" for s, j in zip(samples, caption_index)]
        }
        for name, f in self.fields.items():
            if f.source not in texts:
                texts.update(_dense_texts(samples, f.source, rng))
            ids, mask = self.tokenizer(texts[f.source], f.max_length, self.aug if f.augment else None, rng)
            batch[f"{name}_ids"], batch[f"{name}_mask"] = ids, mask
        return batch


def _dense_texts(samples: list[Sample], source: str, rng: np.random.Generator) -> dict[str, list[str]]:
    """The dense text of each sample; for the sentence sources also one of its sentences and that
    sentence with one word changed (another image's sentence when no word can be changed)."""
    dense = [_pick_dense(s, rng) for s in samples]
    if source == "dense":
        return {"dense": dense}
    from d2s.grounding import split_sentences

    from .text_edits import batch_words, edit_sentence

    split = [split_sentences(t) or [t] for t in dense]
    sentences = [ss[int(rng.integers(len(ss)))] for ss in split]
    seen = batch_words([x for ss in split for x in ss])
    negatives = []
    for i, x in enumerate(sentences):
        edited = edit_sentence(x, rng, seen)
        negatives.append(edited if edited is not None else sentences[(i + 1) % len(sentences)])
    return {"dense": dense, "sentence": sentences, "sentence_negative": negatives}


def _pick_dense(s: Sample, rng: np.random.Generator) -> str:
    kept = s.kept_dense()
    return kept[int(rng.integers(len(kept)))].text


def _reader_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _configure_loader_worker(sharing_strategy: str) -> None:
    """Settings for a data-loader worker process (it serves only this stream).

    - Batches go to the trainer by shared-memory file name (torch's ``file_system`` strategy)
      rather than by file descriptor. A descriptor is handed over by a helper thread of the
      worker, which must take the GIL from the worker's main thread while that decodes the
      next batch: on 2 CPU cores the trainer waited 5.6-10.5 ms per step for it, against
      1.5-4.4 ms by name (benchmarks/vse_throughput.py --sharing). Segments are freed with
      their last reference; those of batches still in flight when a loader is dropped, and
      all of them if the processes die, are removed by torch's shm manager when the training
      process exits.
    - The loader's workers are the parallelism: a tokenizer thread pool in each would compete
      with the training process for its cores.
    """
    torch.multiprocessing.set_sharing_strategy(sharing_strategy)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches from the shards for process ``rank`` of ``world_size`` (see module doc)."""

    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        collate: Collate,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        need_sparse: bool = True,
        need_dense: bool = False,
        start_batch: int = 0,
        sharing_strategy: str = "file_system",
        caption_sampling: str = "each",
        integrity: Integrity | None = None,
    ):
        super().__init__()
        if not urls:
            raise ValueError("no training shards")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.need_sparse = need_sparse
        self.need_dense = need_dense
        self.start_batch = start_batch
        if sharing_strategy not in torch.multiprocessing.get_all_sharing_strategies():
            raise ValueError(
                f"sharing_strategy: {sharing_strategy!r} is not one of "
                f"{sorted(torch.multiprocessing.get_all_sharing_strategies())}"
            )
        self.sharing_strategy = sharing_strategy
        if caption_sampling not in ("each", "random"):
            raise ValueError(f"caption_sampling: {caption_sampling!r} is not one of ['each', 'random']")
        self.caption_sampling = caption_sampling
        #: the shards' dedup index: duplicate images are skipped, duplicate dense texts dropped
        self.integrity = integrity

    def caption_choice(self, s: Sample, pass_: int) -> int | None:
        """The sparse caption ``s`` uses in pass ``pass_`` over the shards (None: drawn in collate)."""
        n = len(s.sparse)
        if self.caption_sampling == "random" or n == 0:
            return None
        cycle, pos = divmod(pass_, n)
        perm = np.random.default_rng([self.seed, image_id_int(s.id), cycle]).permutation(n)
        return int(perm[pos])

    def _epoch_shards(self, reader: int, readers: int) -> Iterator[dict]:
        split_shards = len(self.urls) >= readers
        for epoch in itertools.count():
            order = list(self.urls)
            random.Random(_reader_seed(self.seed, epoch)).shuffle(order)
            for i, url in enumerate(order):
                # node + worker split at shard level: every reader gets a disjoint subset
                if not split_shards or i % readers == reader:
                    yield {"url": url, "pass": epoch}

    def _usable(self, s: Sample) -> bool:
        return (not self.need_sparse or bool(s.sparse)) and (not self.need_dense or bool(s.kept_dense()))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            _configure_loader_worker(self.sharing_strategy)
        # The loader takes workers round robin starting with worker 0, and global batch i came
        # from worker i % W in the first run; after resuming at batch b, loader worker w plays
        # the part of worker (w + b) % W and skips the batches that part already produced.
        worker = (loader_worker + self.start_batch) % workers
        reader, readers = self.rank * workers + worker, self.world_size * workers
        skip = max(0, -(-(self.start_batch - worker) // workers))
        sample_split = len(self.urls) < readers

        expand = wds.tarfile_to_samples(handler=wds.reraise_exception)

        def shard_records(src):
            # raw records of each shard (the handler re-raises with the shard name), tagged with
            # the pass over the shards they belong to
            for item in src:
                for rec in expand(iter([{"url": item["url"]}])):
                    rec["__pass__"] = item["pass"]
                    yield rec

        def split_samples(src):
            # sample-level node + worker split, used only when shards are too few to split
            for i, rec in enumerate(src):
                if not sample_split or i % readers == reader:
                    yield rec

        def parse(src):
            for rec in src:
                s = Sample.from_wds(rec)
                if self.integrity is not None and self.integrity.apply(s, rec.get("__url__")) is None:
                    continue  # a duplicate (d2s.integrity), counted once when the run was planned
                if self._usable(s):
                    yield s, self.caption_choice(s, rec["__pass__"]), rec.get("__url__")

        def skip_and_collate(src):
            for k, raw in enumerate(src):
                if k < skip:
                    continue
                samples = [s for s, _, _ in raw]
                chosen = [j for _, j, _ in raw]
                yield self.collate(
                    samples, [self.seed, reader, k], None if None in chosen else chosen, shards=[u for _, _, u in raw]
                )

        pipeline = wds.DataPipeline(
            lambda: self._epoch_shards(reader, readers),
            shard_records,
            split_samples,
            parse,
            wds.shuffle(
                self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(_reader_seed(self.seed, reader, 1))
            ),
            wds.batched(self.batch_size, collation_fn=list, partial=False),
            skip_and_collate,
        )
        return iter(pipeline)


def check_split_usable(urls: list[str], need_dense: bool, recipe_name: str) -> None:
    """Fail early (naming the shard) when the recipe needs dense texts the shards do not have."""
    if not need_dense:
        return
    from d2s.shards import iter_samples

    for i, s in enumerate(iter_samples(urls[:1])):
        if s.kept_dense():
            return
        if i >= 200:
            break
    raise SampleError(
        f"recipe {recipe_name!r} needs a kept dense text per image, but the first samples of {urls[0]} have none "
        "(run densecap on these shards first)"
    )


def iter_eval_batches(
    urls: list[str], batch_size: int, max_images: int | None, *, with_shards: bool = False
) -> Iterator:
    """Samples of an evaluation split in order, in lists of ``batch_size``; with ``with_shards``,
    (samples, shard of each sample) pairs."""
    from d2s.shards import iter_records

    batch: list[Sample] = []
    shards: list[str | None] = []
    for i, rec in enumerate(iter_records(urls)):
        if max_images is not None and i >= max_images:
            break
        batch.append(Sample.from_wds(rec))
        shards.append(rec.get("__url__"))
        if len(batch) == batch_size:
            yield (batch, shards) if with_shards else batch
            batch, shards = [], []
    if batch:
        yield (batch, shards) if with_shards else batch
