"""Backbone cut points, SimpleNet patch aggregation and the feature store."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from comet_ray.config import FeatureConfig
from comet_ray.features.aggregation import aggregate_patches
from comet_ray.features.backbone import build_backbone
from comet_ray.features.extractor import PatchFeatureExtractor
from comet_ray.features.store import FeatureStore


def simplenet_reference(maps: list[torch.Tensor], pre_dim: int, dim: int) -> torch.Tensor:
    """SimpleNet's original order: unfold, upsample the unfolded C*9 map, then pool per layer and jointly."""
    b, _, h, w = maps[0].shape
    per_layer = []
    for fmap in maps:
        c, hh, ww = fmap.shape[1:]
        unfolded = F.unfold(fmap, 3, padding=1).reshape(b, c * 9, hh, ww)
        if (hh, ww) != (h, w):
            unfolded = F.interpolate(unfolded, size=(h, w), mode="bilinear", align_corners=False)
        flat = unfolded.reshape(b, c * 9, h * w).permute(0, 2, 1).reshape(-1, 1, c * 9)
        per_layer.append(F.adaptive_avg_pool1d(flat, pre_dim).reshape(b * h * w, pre_dim))
    stacked = torch.stack(per_layer, dim=1).reshape(b * h * w, 1, -1)
    return F.adaptive_avg_pool1d(stacked, dim).reshape(b, h * w, dim)


@pytest.mark.parametrize("pre_dim,dim", [(64, 48), (40, 40), (300, 256)])
def test_aggregation_matches_simplenet_order(pre_dim: int, dim: int) -> None:
    torch.manual_seed(0)
    maps = [torch.randn(2, 8, 8, 8), torch.randn(2, 12, 4, 4)]
    ours = aggregate_patches(maps, pre_dim, dim)
    reference = simplenet_reference(maps, pre_dim, dim)
    assert ours.shape == (2, 64, dim)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,channels", [("mobilenet_v2", (32, 96)), ("resnet18", (128, 256))])
def test_backbone_strides_8_and_16(name: str, channels: tuple[int, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trunk, source = build_backbone(name, pretrained=False)
    assert source == "random init"
    a, b = trunk(torch.zeros(1, 3, 64, 64))
    assert a.shape[1:] == (channels[0], 8, 8)
    assert b.shape[1:] == (channels[1], 4, 4)
    assert not any(p.requires_grad for p in trunk.parameters())


def test_missing_weights_fall_back_loudly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("COMET_RAY_OFFLINE", "1")
    with pytest.warns(UserWarning, match="RANDOM initialisation"):
        _, source = build_backbone("mobilenet_v2", pretrained=True)
    assert source == "random init"


def test_random_init_is_the_same_in_every_call() -> None:
    """Checkpoints trained on random features must see the same features at predict time."""
    config = FeatureConfig(backbone="mobilenet_v2", image_size=64, feature_dim=32, pretrained=False)
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    first = PatchFeatureExtractor(config)(images)
    torch.manual_seed(2)
    second = PatchFeatureExtractor(config)(images)
    torch.testing.assert_close(first, second)
    assert first.shape == (2, 64, 32)


def test_explicit_weights_file(tmp_path) -> None:
    import torchvision

    model = torchvision.models.mobilenet_v2()
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    loaded, source = build_backbone("mobilenet_v2", weights=str(path))
    assert source == str(path)
    torch.testing.assert_close(loaded.stage_a[0][0].weight, model.features[0][0].weight)


@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
def test_feature_entry_reads_only_the_rows_asked_for(tmp_path, cache_dtype) -> None:
    """Parts written in any order; reads of scattered rows (one shard) come back exact, masks too, and a
    store of a shard holds only its rows."""
    import pyarrow.fs as pafs

    from comet_ray.features.entry import EntryIndex, FeatureEntry, as_numpy, pack_masks, part_name, write_part
    from comet_ray.features.store import storage_dtype

    fs, path = pafs.LocalFileSystem(), str(tmp_path / "entry")
    features = torch.randn(10, 16, 8).to(storage_dtype(cache_dtype))
    masks = torch.rand(10, 16, 16) > 0.5
    index = EntryIndex((4, 4), 8, cache_dtype, 16, True, {"backbone": "x"})
    assert FeatureEntry.open(fs, path) is None
    for first in (5, 0):  # the second part first, as Ray Data may return them
        name = part_name(first, first + 4)
        write_part(
            fs, path, name, as_numpy(features[first : first + 5]), pack_masks(masks[first : first + 5])
        )
        index.add_part(name, range(first, first + 5), [f"s{i}" for i in range(first, first + 5)], [True] * 5)
    assert FeatureEntry.open(fs, path) is None  # no index yet: incomplete
    index.write(fs, path)
    entry = FeatureEntry.open(fs, path)
    assert entry.ids == [f"s{i}" for i in range(10)] and entry.row_bytes == 16 * 8 * 2
    rows = [7, 1, 2, 3, 9]
    assert torch.equal(entry.read_features(rows).view(torch.int16), features[rows].view(torch.int16))
    got_masks, available = entry.read_masks(rows)
    assert torch.equal(got_masks, masks[rows]) and bool(available.all())
    shard = entry.store(entry.ids, held=torch.arange(1, 10, 2))
    assert len(shard) == 10 and shard.nbytes == 5 * entry.row_bytes
    torch.testing.assert_close(shard.batch(torch.tensor([9, 3])), features[[9, 3]].float())
    with pytest.raises(IndexError, match="shard"):
        shard.batch(torch.tensor([2]))


def test_feature_store_subset() -> None:
    features = torch.randn(5, 16, 8).to(torch.float16)
    store = FeatureStore([f"s{i}" for i in range(5)], features, (4, 4))
    sub = store.subset(["s4", "s0"])
    torch.testing.assert_close(sub.features, features[[4, 0]])
    with pytest.raises(ValueError, match="duplicate"):
        FeatureStore(["a", "a"], torch.zeros(2, 1, 1), (1, 1))
