"""Choosing anchors from a dataloader: stratified by class, reproducible, fixed for a run.

The measurements of :mod:`cm_monitor` start from *anchors*: held-out inputs with their labels.
This module reads ``(inputs, labels)`` out of the batches of any dataloader (tuples, lists, dicts
or a user function) and keeps a uniformly random sample of ``per_class`` inputs of every class,
drawn with a dedicated :class:`torch.Generator` (the global RNG is never used), while streaming
over the batches: memory is bounded by ``per_class × classes`` inputs, whatever the dataset size.
An input's chance to be drawn comes from its content (:class:`ContentKeys`), not its position, so
the sample does not depend on the order of the batches, and the samples of the parts of the data
(one per process under DDP) merge into the sample of the whole (:func:`merge_samples`).

Pure PyTorch; no Lightning import (the callbacks in :mod:`cm_monitor.callbacks` use it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

#: Signature of a user function that maps one batch to ``(inputs, labels)``.
BatchReader = Callable[[Any], tuple[Tensor, Tensor]]

#: Keys tried, in order, for the inputs of a dict batch when no ``input_key`` is given.
INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "image", "images", "pixel_values", "features", "data")
#: Keys tried, in order, for the labels of a dict batch when no ``label_key`` is given.
LABEL_KEYS: tuple[str, ...] = ("y", "label", "labels", "target", "targets", "class", "classes")


def split_batch(batch: Any, *, input_key: str | None = None, label_key: str | None = None) -> tuple[Tensor, Tensor]:
    """Return ``(inputs, labels)`` from one batch, or raise an error that says what to pass.

    Accepted batches: a tuple or list whose first two items are the inputs and the labels (further
    items are ignored), or a mapping with the inputs under ``input_key`` and the labels under
    ``label_key`` (by default the first of :data:`INPUT_KEYS` / :data:`LABEL_KEYS` present).
    The result is checked by :func:`check_inputs_labels`.
    """
    if isinstance(batch, Mapping):
        keys = list(batch.keys())
        x_key = _pick_key(keys, input_key, INPUT_KEYS, "input_key", "inputs")
        y_key = _pick_key(keys, label_key, LABEL_KEYS, "label_key", "labels")
        inputs, labels = batch[x_key], batch[y_key]
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes) and not isinstance(batch, Tensor):
        if len(batch) < 2:
            raise ValueError(
                f"A validation batch is a {type(batch).__name__} of length {len(batch)}; expected "
                "(inputs, labels, ...). Pass `batch_to_inputs=` a function that maps a batch to "
                "(inputs, labels)."
            )
        inputs, labels = batch[0], batch[1]
    else:
        raise TypeError(
            f"A validation batch is a {type(batch).__name__}, which is not recognized; expected a "
            "tuple/list (inputs, labels, ...) or a dict. Pass `batch_to_inputs=` a function that "
            "maps a batch to (inputs, labels)."
        )
    return check_inputs_labels(inputs, labels)


def check_inputs_labels(inputs: Any, labels: Any, source: str = "the validation batch") -> tuple[Tensor, Tensor]:
    """Raise a clear error unless ``inputs`` is a float batch ``[B, ...]`` and ``labels`` is ``[B]`` integer."""
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"The inputs read from {source} are a {type(inputs).__name__}; expected a tensor "
            "[B, *shape]. Pass `batch_to_inputs=` a function that maps a batch to (inputs, labels)."
        )
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"The labels read from {source} are a {type(labels).__name__}; expected an integer "
            "tensor [B]. Pass `batch_to_inputs=` a function that maps a batch to (inputs, labels)."
        )
    if not inputs.is_floating_point():
        raise TypeError(
            f"The inputs read from {source} have dtype {inputs.dtype}; the measurements move inputs "
            "continuously, so they need floating-point inputs (convert images to float in the "
            "dataset or in `batch_to_inputs=`)."
        )
    if inputs.dim() < 2:
        raise ValueError(
            f"The inputs read from {source} have shape {tuple(inputs.shape)}; expected a batch [B, *shape]."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"The labels read from {source} have dtype {labels.dtype}; expected integer class ids "
            "(not one-hot or soft labels). Pass `batch_to_inputs=` to convert them."
        )
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"The labels read from {source} have shape {tuple(labels.shape)} for inputs of shape "
            f"{tuple(inputs.shape)}; expected one class id per input, [{inputs.shape[0]}]."
        )
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"The labels read from {source} contain the negative class id {int(labels.min())}.")
    return inputs, labels


def make_batch_reader(
    batch_to_inputs: BatchReader | None = None,
    *,
    input_key: str | None = None,
    label_key: str | None = None,
) -> BatchReader:
    """A function that maps a batch to checked ``(inputs, labels)``: the user's, or :func:`split_batch`.

    The result pickles whenever ``batch_to_inputs`` does (``ddp_spawn`` pickles the callbacks).
    """
    if batch_to_inputs is not None and not callable(batch_to_inputs):
        raise TypeError(f"`batch_to_inputs` must be callable, got a {type(batch_to_inputs).__name__}.")
    return _Reader(batch_to_inputs, input_key, label_key)


@dataclass(frozen=True)
class _Reader:
    fn: BatchReader | None
    input_key: str | None
    label_key: str | None

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]:
        if self.fn is None:
            return split_batch(batch, input_key=self.input_key, label_key=self.label_key)
        out = self.fn(batch)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(f"`batch_to_inputs` returned a {type(out).__name__}; expected a pair (inputs, labels).")
        return check_inputs_labels(out[0], out[1], "`batch_to_inputs`'s output")


@dataclass(frozen=True)
class AnchorSample:
    """Anchors drawn from a dataloader.

    Attributes:
        inputs: ``[A, *shape]`` the anchors (CPU), grouped by class in increasing class order.
        labels: ``[A]`` their classes (CPU, ``torch.long``).
        counts: number of examples of each class read while sampling (class id → count); for a
            class with fewer than ``per_class`` distinct examples, the number of distinct ones.
        num_batches: number of batches read.
        keys: ``[A]`` the anchors' sampling keys (``torch.long``), ascending within a class: a
            pseudo-random function of each input's content (see :class:`StratifiedReservoir`);
            :func:`merge_samples` needs them.
        seen: for the classes counted without anchors after ``max_classes`` was passed, up to
            ``per_class`` distinct keys each, so that merged counts of distinct inputs stay exact.
    """

    inputs: Tensor
    labels: Tensor
    counts: dict[int, int]
    num_batches: int
    keys: Tensor | None = None
    seen: dict[int, Tensor] = field(default_factory=dict)

    def check_classes(self, classes: Iterable[int], per_class: int) -> None:
        """Raise a clear error if some class in ``classes`` has fewer than ``per_class`` examples."""
        short = {c: self.counts.get(c, 0) for c in classes if self.counts.get(c, 0) < per_class}
        if short:
            listed = ", ".join(f"class {c}: {n}" for c, n in sorted(short.items())[:_LISTED])
            if len(short) > _LISTED:  # a 1000-class model with a small validation set: not every class
                listed += f", and {len(short) - _LISTED} more classes"
            raise ValueError(
                f"Too few validation examples to draw {per_class} anchors per class ({listed}; "
                f"read {self.num_batches} batches). Lower `num_anchors`, or use a validation set "
                "with more examples of these classes."
            )


#: Messages list at most this many classes by name.
_LISTED = 20

#: The prime of the content hash (the Mersenne prime 2**31 - 1).
_PRIME = 2**31 - 1
#: Content hashing works on at most this many int64 elements at once (256 MiB).
_HASH_ELEMENTS = 2**25


class ContentKeys:
    """Sampling keys that are a pseudo-random function of each input's content and the seed.

    The key of an input depends on its bytes only, not on where it is in the data, so a sample
    by smallest keys is the same whatever the order of the batches and however the data is split
    between processes (the shards of a ``DistributedSampler``), and a repeated input (the padding
    of a ``DistributedSampler``) gets the same key as its original. Two universal hashes modulo
    ``2**31 - 1`` with random weights (exact integer arithmetic, the same on every device and for
    every batch size) are mixed by the splitmix64 finalizer into a 63-bit key.
    """

    def __init__(self, words: int, generator: torch.Generator):
        self.weights = torch.randint(1, _PRIME, (2, words), generator=generator, dtype=torch.int64)
        self.salt = int(torch.randint(0, 2**62, (1,), generator=generator))

    def __call__(self, inputs: Tensor) -> Tensor:
        """``[B]`` keys (CPU, ``torch.long``) of a batch ``[B, *shape]`` (on any device)."""
        words = _words(inputs)
        weights = self.weights.to(words.device)
        step = max(1, _HASH_ELEMENTS // max(1, words.shape[1]))
        parts = []
        for start in range(0, words.shape[0], step):
            w = words[start : start + step].to(torch.int64).remainder(_PRIME)
            parts.append(torch.stack([(w * v).remainder(_PRIME).sum(1).remainder(_PRIME) for v in weights], 1))
        hashes = torch.cat(parts).cpu().numpy().astype(np.uint64)  # [B, 2], each < 2**31
        return torch.from_numpy(_mix((hashes[:, 0] << np.uint64(31)) | hashes[:, 1], self.salt))


def _words(inputs: Tensor) -> Tensor:
    """``[B, W]`` the bytes of each input as integers (int16 words for 2-byte dtypes, else int32)."""
    flat = inputs.detach().reshape(inputs.shape[0], -1).contiguous()
    size = flat.element_size()
    kind = torch.uint8 if size == 1 else torch.int16 if size == 2 else torch.int32
    return flat.view(kind)


def _mix(values: np.ndarray, salt: int) -> np.ndarray:
    """The splitmix64 finalizer of ``values ^ salt`` (uint64), shifted to non-negative int64."""
    z = values ^ np.uint64(salt)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


class StratifiedReservoir:
    """Streaming uniform sample of up to ``per_class`` distinct items of every class.

    Every item gets a pseudo-random key from its content (:class:`ContentKeys`, whose weights are
    drawn from ``generator`` at the first batch); for each class the ``per_class`` items with the
    smallest distinct keys are kept, so a repeated input counts once. This is a uniform sample
    without replacement of each class, computed batch by batch in bounded memory, that does not
    depend on the order of the batches: samples of disjoint parts of the data merge into the
    sample of the whole (:func:`merge_samples`). Only the inputs that enter the sample are copied
    to the CPU.
    """

    def __init__(
        self,
        per_class: int,
        generator: torch.Generator,
        classes: Collection[int] | None = None,
        max_classes: int | None = None,
    ):
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"`per_class` must be a positive integer, got {per_class!r}.")
        if max_classes is not None and (
            isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < 1
        ):
            raise ValueError(f"`max_classes` must be a positive integer or None, got {max_classes!r}.")
        if classes is not None and max_classes is not None:
            raise ValueError("Pass `classes` (sample those) or `max_classes` (stop holding past that many), not both.")
        self.per_class = per_class
        self.generator = generator
        #: sample only these classes (None: all); the others are counted, not hashed nor kept
        self.classes = None if classes is None else torch.tensor(sorted(set(classes)), dtype=torch.long)
        #: once more classes than this have been read, nothing more is held (only counted)
        self.max_classes = max_classes
        self._inputs: dict[int, Tensor] = {}
        self._keys: dict[int, Tensor] = {}
        self._seen: dict[int, Tensor] | None = None  # past max_classes: distinct keys of every class
        self.counts: dict[int, int] = {}
        self._shape: torch.Size | None = None
        self._hash: ContentKeys | None = None

    def add(self, inputs: Tensor, labels: Tensor) -> None:
        """Offer a batch ``inputs [B, *shape]`` with ``labels [B]``."""
        if self._shape is None:
            self._shape = inputs.shape[1:]
            self._hash = ContentKeys(_words(inputs[:1]).shape[1], self.generator)
        elif inputs.shape[1:] != self._shape:
            raise ValueError(
                f"Validation inputs change shape between batches ({tuple(self._shape)} then "
                f"{tuple(inputs.shape[1:])}); anchors must all have one shape."
            )
        assert self._hash is not None
        labels = labels.detach().to("cpu", torch.long)
        for c, n in zip(*(t.tolist() for t in labels.unique(return_counts=True)), strict=True):
            self.counts[c] = self.counts.get(c, 0) + n  # every class read, sampled or not
        if self.max_classes is not None and len(self.counts) > self.max_classes:
            self._stop_holding()
        if self.classes is not None:  # hash and keep only the sampled classes
            sampled = torch.isin(labels, self.classes)
            if self._seen is not None:
                self._see(inputs[~sampled.to(inputs.device)], labels[~sampled])
            inputs, labels = inputs[sampled.to(inputs.device)], labels[sampled]
            if labels.numel() == 0:
                return
        keys = self._hash(inputs)
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().squeeze(1)
            old = self._keys.get(c, keys[:0])
            keep = _smallest_distinct(torch.cat([old, keys[rows]]), self.per_class)
            kept, new = keep[keep < old.numel()], rows[keep[keep >= old.numel()] - old.numel()]
            fresh = inputs.detach()[new.to(inputs.device)].to("cpu")
            x = fresh if c not in self._inputs else torch.cat([self._inputs[c][kept], fresh])
            k = torch.cat([old[kept], keys[new]])
            order = k.argsort()
            # clone: never keep a view of (or an inference-mode tensor from) the user's batch
            with torch.inference_mode(False):
                self._inputs[c], self._keys[c] = x[order].clone(), k[order].clone()

    def _stop_holding(self) -> None:
        """More than ``max_classes`` classes: drop the inputs held and from now on only count, keeping
        up to ``per_class`` distinct keys of every class (the short-class test needs distinct inputs)."""
        if self._seen is None:
            self._seen, self._inputs, self._keys = dict(self._keys), {}, {}
            self.classes = torch.zeros(0, dtype=torch.long)

    def _see(self, inputs: Tensor, labels: Tensor) -> None:
        """Add the keys of the rows whose class has fewer than ``per_class`` distinct keys yet."""
        assert self._seen is not None and self._hash is not None
        full = torch.tensor([c for c, k in self._seen.items() if k.numel() >= self.per_class], dtype=torch.long)
        rows = (~torch.isin(labels, full)).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        keys, labels = self._hash(inputs[rows.to(inputs.device)]), labels[rows]
        for c in labels.unique().tolist():
            self._seen[c] = torch.cat([self._seen.get(c, keys[:0]), keys[labels == c]]).unique()[: self.per_class]

    def sample(self, num_batches: int = 0) -> AnchorSample:
        """The sample so far, grouped by class and ordered by key within a class (empty if nothing was read)."""
        classes, seen = sorted(self._inputs), self._seen or {}
        distinct = {c: self._keys[c].numel() for c in classes} | {c: k.numel() for c, k in seen.items()}
        # a class with fewer than per_class distinct inputs: that many; a class only counted: as read
        counts = {
            c: n if distinct.get(c, self.per_class) >= self.per_class else distinct[c] for c, n in self.counts.items()
        }
        if not classes:
            empty = torch.zeros(0, dtype=torch.long)
            return AnchorSample(torch.zeros(0), empty, counts, num_batches, empty, dict(seen))
        with torch.inference_mode(False):
            inputs = torch.cat([self._inputs[c] for c in classes]).clone()
            keys = torch.cat([self._keys[c] for c in classes])
        labels = torch.cat([torch.full((self._keys[c].numel(),), c, dtype=torch.long) for c in classes])
        return AnchorSample(inputs, labels, counts, num_batches, keys, dict(seen))

    def result(self, num_batches: int = 0) -> AnchorSample:
        """:meth:`sample`, or an error when nothing was read."""
        if not self.counts:
            raise ValueError("No examples were read from the validation dataloader (it is empty).")
        return self.sample(num_batches)


def _smallest_distinct(keys: Tensor, k: int) -> Tensor:
    """Positions in ``keys`` of its ``k`` smallest distinct values (the first position of each)."""
    unique, inverse = torch.unique(keys, return_inverse=True)  # sorted
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(keys.numel()), reduce="amin")
    return first[:k]


def merge_samples(samples: Sequence[AnchorSample], per_class: int) -> AnchorSample:
    """The sample of the whole data from the samples of its parts (e.g. one per process).

    Each part must have been drawn with :class:`StratifiedReservoir` (e.g. :func:`sample_anchors`)
    with the same ``per_class`` and the same seed: per class the ``per_class`` smallest distinct
    keys of all parts are kept, which is the sample one reservoir would have drawn from all the
    data (an input in several parts, such as the padding of a ``DistributedSampler``, counts once).
    Empty parts are allowed; the result is empty if all are.
    """
    parts = [s for s in samples if s.labels.numel()]
    if any(s.keys is None for s in parts):
        raise ValueError("`merge_samples` needs samples with keys (drawn by StratifiedReservoir).")
    counts, seen = _merged_counts(samples, per_class)
    num_batches = sum(s.num_batches for s in samples)
    if not parts:
        return AnchorSample(torch.zeros(0), torch.zeros(0, dtype=torch.long), counts, num_batches, seen=seen)
    inputs = torch.cat([s.inputs for s in parts])
    labels = torch.cat([s.labels for s in parts])
    keys = torch.cat([s.keys for s in parts])  # type: ignore[misc]
    xs, ys, ks = [], [], []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        keep = rows[_smallest_distinct(keys[rows], per_class)]  # ascending keys
        xs.append(inputs[keep])
        ks.append(keys[keep])
        ys.append(labels[keep])
    return AnchorSample(torch.cat(xs), torch.cat(ys), counts, num_batches, torch.cat(ks), seen)


def _merged_counts(samples: Sequence[AnchorSample], per_class: int) -> tuple[dict[int, int], dict[int, Tensor]]:
    """The counts of the whole data: per class the examples read, or the distinct ones (by key, over
    the anchors and the ``seen`` keys of every part) when fewer than ``per_class``; and the merged
    ``seen`` keys."""
    read: dict[int, int] = {}
    for s in samples:
        for c, n in s.counts.items():
            read[c] = read.get(c, 0) + n
    found: dict[int, list[Tensor]] = {}
    for s in samples:
        for c, k in s.seen.items():
            found.setdefault(c, []).append(k)
        if s.keys is not None and s.labels.numel():
            for c in s.labels.unique().tolist():
                found.setdefault(c, []).append(s.keys[s.labels == c])
    distinct = {c: torch.cat(k).unique() for c, k in found.items()}
    counts = {
        c: n if c not in distinct or distinct[c].numel() >= per_class else distinct[c].numel()
        for c, n in sorted(read.items())
    }
    seen = {c: distinct[c][:per_class] for c in sorted({c for s in samples for c in s.seen})}
    return counts, seen


def sample_anchors(
    batches: Iterable[Any],
    per_class: int,
    *,
    generator: torch.Generator | int | None = None,
    read_batch: BatchReader | None = None,
    max_batches: int | None = None,
    transform: Callable[[Any], Any] | None = None,
    allow_empty: bool = False,
    classes: Collection[int] | None = None,
    max_classes: int | None = None,
) -> AnchorSample:
    """Draw up to ``per_class`` anchors of every class from an iterable of batches.

    The sample depends on the seed and on which inputs the batches hold, not on their order or
    batching (see :class:`StratifiedReservoir`); an input that appears twice counts once.

    Args:
        batches: a dataloader or any iterable of batches.
        per_class: anchors kept per class (classes with fewer examples keep all of them; check
            with :meth:`AnchorSample.check_classes`).
        generator: a CPU ``torch.Generator`` or an int seed (default seed 0); the global RNG is not used.
        read_batch: maps a batch to ``(inputs, labels)`` (default :func:`split_batch`).
        max_batches: read at most this many batches (default: all).
        transform: applied to each batch before ``read_batch`` (e.g. moving it to a device).
        allow_empty: return an empty sample when there are no batches (a part of the data, to
            merge with :func:`merge_samples`) instead of raising.
        classes: draw anchors of these classes only (None: of every class); the others are only
            counted (in :attr:`AnchorSample.counts`), so their inputs are neither hashed nor held.
            The anchors of a class do not depend on which other classes are drawn.
        max_classes: when more classes than this are read, the sample is empty and holds only the
            counts of every class (memory bounded by ``max_classes · per_class`` inputs); draw again
            with ``classes`` then.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from cm_monitor.anchors import sample_anchors
        >>> data = TensorDataset(torch.randn(100, 4), torch.arange(100) % 3)
        >>> sample = sample_anchors(DataLoader(data, batch_size=16), per_class=5, generator=0)
        >>> sample.inputs.shape, sample.labels.tolist()
        (torch.Size([15, 4]), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    """
    from cm_monitor._model import make_generator

    gen = make_generator(generator)
    read = read_batch if read_batch is not None else split_batch
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"`max_batches` must be a positive integer or None, got {max_batches!r}.")
    reservoir = StratifiedReservoir(per_class, gen, classes, max_classes)
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        if transform is not None:
            batch = transform(batch)
        inputs, labels = read(batch)
        reservoir.add(inputs, labels)
        n += 1
    return reservoir.sample(num_batches=n) if allow_empty else reservoir.result(num_batches=n)


@contextlib.contextmanager
def generators_kept(loader: Any) -> Iterator[None]:
    """The states of the random generators that ``loader`` reads when it is iterated (its own
    ``generator``, its sampler's and its batch sampler's sampler's: a shuffle, the workers' base
    seed) are restored on exit, so that reading it leaves its next iteration as it was."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    for owner in (loader, sampler, inner):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    states = [g.get_state() for g in found]
    try:
        yield
    finally:
        for g, state in zip(found, states, strict=True):
            g.set_state(state)


class OwnIterator:
    """The batches of ``loader`` read once without taking over its persistent workers; :meth:`close` after.

    A :class:`~torch.utils.data.DataLoader` with ``persistent_workers=True`` keeps the first
    iterator made from it (and its worker processes) for every later pass, and that iterator's
    seed is drawn from the global RNG when it is made. Were the anchors read through it, the
    training loop would reuse it and skip that draw, and every random number of training after it
    would shift. This reads such a loader through a fresh iterator of its own, which never becomes
    the loader's (its workers stop in :meth:`close`). A subclass with its own ``__iter__`` (which
    may change the batches) is read through it, and the persistent iterator that made, if the
    loader had none, is stopped and dropped in :meth:`close`. Any other iterable is read as it is.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self._iterator: Any = None  # a fresh iterator made here
        self._through_loader = False  # read through a subclass's own __iter__
        self._had_iterator = False

    def __iter__(self) -> Iterator[Any]:
        loader = self.loader
        if not (isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0):
            return iter(loader)
        if type(loader).__iter__ is DataLoader.__iter__:
            self.close()
            self._iterator = loader._get_iterator()  # what DataLoader.__iter__ makes without persistent workers
            return self._iterator
        self._through_loader, self._had_iterator = True, loader._iterator is not None
        return iter(loader)

    def close(self) -> None:
        """Stop the worker processes of the iterator made here, or of the loader's if reading made it."""
        if self._iterator is not None:
            self._iterator._shutdown_workers()
            self._iterator = None
        made = getattr(self.loader, "_iterator", None) if self._through_loader and not self._had_iterator else None
        if made is not None:
            made._shutdown_workers()
            self.loader._iterator = None  # type: ignore[attr-defined]
        self._through_loader = False


def _pick_key(keys: list, key: str | None, candidates: tuple[str, ...], arg: str, what: str) -> Any:
    if key is not None:
        if key not in keys:
            raise ValueError(f"A validation batch is a dict with keys {keys}; `{arg}={key!r}` is not one of them.")
        return key
    for k in candidates:
        if k in keys:
            return k
    raise ValueError(
        f"A validation batch is a dict with keys {keys}; none of them is a known name for the "
        f"{what} ({', '.join(candidates)}). Pass `{arg}=` the key of the {what}."
    )
