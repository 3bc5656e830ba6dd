"""Anchors from a dataloader: batch reading, stratified sampling, reproducibility, errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cm_monitor.anchors import StratifiedReservoir, make_batch_reader, merge_samples, sample_anchors, split_batch


def _data(n=120, classes=4, shape=(3,)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % classes
    return x, y


class DictData(Dataset):
    def __init__(self, x, y, keys=("image", "label")):
        self.x, self.y, self.keys = x, y, keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i], "id": i}


def test_split_batch_tuple_list_dict():
    x, y = torch.randn(5, 2), torch.arange(5)
    for batch in [(x, y), [x, y], (x, y, "extra"), {"x": x, "y": y}, {"pixel_values": x, "labels": y, "z": 1}]:
        a, b = split_batch(batch)
        assert a is x and b is y
    a, b = split_batch({"pix": x, "cls": y}, input_key="pix", label_key="cls")
    assert a is x and b is y


@pytest.mark.parametrize(
    ("batch", "kwargs", "error", "match"),
    [
        (torch.randn(4, 2), {}, TypeError, "not recognized.*batch_to_inputs"),
        ((torch.randn(4, 2),), {}, ValueError, "length 1"),
        ({"a": torch.randn(4, 2), "y": torch.arange(4)}, {}, ValueError, "keys \\['a', 'y'\\].*input_key"),
        ({"x": torch.randn(4, 2), "b": torch.arange(4)}, {}, ValueError, "label_key"),
        ({"x": torch.randn(4, 2), "y": torch.arange(4)}, {"input_key": "img"}, ValueError, "input_key='img'"),
        ((torch.arange(8).view(4, 2), torch.arange(4)), {}, TypeError, "floating-point"),
        ((torch.randn(4, 2), torch.randn(4)), {}, TypeError, "integer class ids"),
        ((torch.randn(4, 2), torch.zeros(4, 3, dtype=torch.long)), {}, ValueError, "one class id per input"),
        ((torch.randn(4, 2), torch.arange(3)), {}, ValueError, "one class id per input"),
        ((torch.randn(4, 2), torch.tensor([0, -1, 1, 2])), {}, ValueError, "negative"),
        ((torch.randn(4), torch.arange(4)), {}, ValueError, "batch"),
        (("text", torch.arange(4)), {}, TypeError, "inputs .* are a str"),
    ],
)
def test_split_batch_errors(batch, kwargs, error, match):
    with pytest.raises(error, match=match):
        split_batch(batch, **kwargs)


def test_user_reader_checked():
    reader = make_batch_reader(lambda b: (b["img"], b["lbl"]))
    x, y = reader({"img": torch.randn(2, 3), "lbl": torch.tensor([1, 0])})
    assert x.shape == (2, 3) and y.tolist() == [1, 0]
    with pytest.raises(TypeError, match="expected a pair"):
        make_batch_reader(lambda b: b)(torch.randn(2, 3))
    with pytest.raises(TypeError, match="callable"):
        make_batch_reader("not a function")


def test_stratified_sample_is_uniform_per_class_and_reproducible():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    a = sample_anchors(loader, 5, generator=3)
    b = sample_anchors(loader, 5, generator=3)
    c = sample_anchors(loader, 5, generator=4)
    assert a.labels.tolist() == [k for k in range(4) for _ in range(5)]
    assert a.counts == {0: 30, 1: 30, 2: 30, 3: 30}
    assert a.num_batches == len(loader)
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, c.inputs)
    # every anchor is an input of its class
    for xi, yi in zip(a.inputs, a.labels, strict=True):
        match = (x == xi).all(1).nonzero().squeeze(1)
        assert match.numel() == 1 and int(y[match]) == int(yi)
    # the sample does not depend on the batch size only through the data order: same data, other
    # batching still gives a valid stratified sample
    d = sample_anchors(DataLoader(TensorDataset(x, y), batch_size=50), 5, generator=3)
    assert d.labels.tolist() == a.labels.tolist()


def test_sample_covers_the_whole_loader():
    # classes sorted in the data (as in many validation sets): the sample must not favour early batches
    x = torch.arange(400, dtype=torch.float32)[:, None]
    y = torch.zeros(400, dtype=torch.long)
    picks = torch.cat(
        [sample_anchors(DataLoader(TensorDataset(x, y), batch_size=16), 4, generator=s).inputs for s in range(50)]
    )
    assert picks.mean().item() == pytest.approx(200, abs=25)
    assert picks.max().item() > 350


def test_sample_does_not_touch_global_rng():
    x, y = _data()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    # iterating a DataLoader draws from the global RNG (its base seed); sample_anchors on a
    # plain list of batches must not
    sample_anchors([(x[:10], y[:10]), (x[10:], y[10:])], 2, generator=0)
    assert torch.equal(torch.rand(3), expected)


def test_max_batches_and_transform():
    x, y = _data()
    seen = []

    def transform(batch):
        seen.append(1)
        return batch

    s = sample_anchors(
        DataLoader(TensorDataset(x, y), batch_size=10), 2, generator=0, max_batches=3, transform=transform
    )
    assert s.num_batches == 3 and len(seen) == 3
    assert sum(s.counts.values()) == 30
    with pytest.raises(ValueError, match="max_batches"):
        sample_anchors([], 2, max_batches=0)


def test_dict_batches_through_dataloader():
    x, y = _data()
    loader = DataLoader(DictData(x, y), batch_size=16)
    s = sample_anchors(loader, 3, generator=0)
    assert s.inputs.shape == (12, 3)
    reader = make_batch_reader(input_key="pix", label_key="cls")
    s2 = sample_anchors(
        DataLoader(DictData(x, y, keys=("pix", "cls")), batch_size=16), 3, generator=0, read_batch=reader
    )
    assert torch.equal(s.inputs, s2.inputs)


def test_check_classes_names_the_short_classes():
    x, y = _data(n=20, classes=4)
    s = sample_anchors([(x, y)], 6, generator=0)
    assert s.labels.bincount().tolist() == [5, 5, 5, 5]
    with pytest.raises(ValueError, match=r"class 0: 5, class 1: 5.*class 4: 0.*num_anchors"):
        s.check_classes(range(5), 6)
    s.check_classes(range(4), 5)


def test_empty_and_shape_change():
    with pytest.raises(ValueError, match="empty"):
        sample_anchors([], 2)
    with pytest.raises(ValueError, match="change shape"):
        sample_anchors([(torch.randn(2, 3), torch.arange(2)), (torch.randn(2, 4), torch.arange(2))], 2)
    with pytest.raises(ValueError, match="per_class"):
        StratifiedReservoir(0, torch.Generator())


def test_a_class_filter_hashes_and_holds_only_those_classes_and_draws_the_same_anchors(monkeypatch):
    from cm_monitor import anchors as anchors_module

    x, y = torch.randn(120, 5), torch.arange(120) % 6
    batches = [(x[i : i + 25], y[i : i + 25]) for i in range(0, 120, 25)]
    hashed = []
    call = anchors_module.ContentKeys.__call__
    monkeypatch.setattr(anchors_module.ContentKeys, "__call__", lambda self, b: hashed.append(len(b)) or call(self, b))
    every = anchors_module.sample_anchors(batches, 3, generator=0)
    assert sum(hashed) == 120  # control: every input hashed
    hashed.clear()
    some = anchors_module.sample_anchors(batches, 3, generator=0, classes=[1, 4])
    assert sum(hashed) == 40  # the 20 inputs of each of the two classes
    keep = torch.isin(every.labels, torch.tensor([1, 4]))
    assert torch.equal(some.inputs, every.inputs[keep]) and torch.equal(some.labels, every.labels[keep])
    assert some.counts == every.counts  # every class counted


def test_a_class_limit_stops_holding_inputs_and_keeps_counting():
    x, y = torch.randn(120, 5), torch.arange(120) % 6
    batches = [(x[i : i + 25], y[i : i + 25]) for i in range(0, 120, 25)]
    within = sample_anchors(batches, 3, generator=0, max_classes=6)
    assert torch.equal(within.inputs, sample_anchors(batches, 3, generator=0).inputs)  # control: within the limit
    beyond = sample_anchors(batches, 3, generator=0, max_classes=5, allow_empty=True)
    assert beyond.labels.numel() == 0 and beyond.counts == dict.fromkeys(range(6), 20)
    parts = [sample_anchors(batches[:2], 3, generator=0, max_classes=5, allow_empty=True), beyond]
    assert merge_samples(parts, 3).counts == {c: 20 + n for c, n in parts[0].counts.items()}  # counts add up


def test_a_class_limit_without_allow_empty_returns_the_counts_and_bad_arguments_are_errors():
    x, y = torch.randn(60, 5), torch.arange(60) % 6
    beyond = sample_anchors([(x, y)], 3, generator=0, max_classes=5)  # data was read: no "empty" error
    assert beyond.labels.numel() == 0 and beyond.counts == dict.fromkeys(range(6), 10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`max_classes` must be a positive integer"):
            sample_anchors([(x, y)], 3, max_classes=bad)
    with pytest.raises(ValueError, match="not both"):
        sample_anchors([(x, y)], 3, classes=[0], max_classes=3)
    with pytest.raises(ValueError, match="it is empty"):  # control: nothing read is still an error
        sample_anchors([], 3, max_classes=5)
