"""The memory bank at scale: the per-part coreset covers the patches about as well as exact greedy, is
deterministic, the faiss search equals brute force, and leave-one-out never matches an image's own rows."""

from __future__ import annotations

import torch

from comet_ray.models.coreset import coreset_rows, split_shares
from comet_ray.models.knn import PatchKNN, leave_one_out_scores, nearest_distances
from comet_ray.models.search import build_index, nearest, nearest_excluding


def clustered(n: int = 6000, dim: int = 64, clusters: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 4
    which = torch.randint(clusters, (n,), generator=g)
    return (centres[which] + 0.3 * torch.randn(n, dim, generator=g)).half()


def covering_radius(points: torch.Tensor, rows: torch.Tensor) -> float:
    return float(nearest_distances(points.float(), points[rows].float()).max())


def test_fast_coreset_covers_about_as_well_as_exact_greedy() -> None:
    points = clustered()
    size = 300
    exact = coreset_rows(points, size, "exact", torch.Generator().manual_seed(1), projection_dim=0)
    fast = coreset_rows(
        points, size, "fast", torch.Generator().manual_seed(1), projection_dim=0, part_rows=1000
    )
    randomly = coreset_rows(points, size, "random", torch.Generator().manual_seed(1))
    assert fast.numel() == exact.numel() == size and fast.unique().numel() == size
    r_exact, r_fast, r_random = (covering_radius(points, r) for r in (exact, fast, randomly))
    assert r_fast <= 1.5 * r_exact, (r_fast, r_exact)  # the composable coreset bound is a small constant
    assert r_fast < r_random, (r_fast, r_random)  # and it is still k-center, not a draw


def test_fast_coreset_is_deterministic_and_never_widens_the_features() -> None:
    points = clustered(seed=2)
    a = coreset_rows(points, 200, "fast", torch.Generator().manual_seed(7), part_rows=512)
    b = coreset_rows(points, 200, "fast", torch.Generator().manual_seed(7), part_rows=512)
    c = coreset_rows(points, 200, "fast", torch.Generator().manual_seed(8), part_rows=512)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert points.dtype == torch.float16  # selected from the stored dtype


def test_shares_follow_part_sizes() -> None:
    assert split_shares(10, [5, 5, 5]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert sum(split_shares(7, [1, 100])) == 7 and split_shares(7, [1, 100])[0] <= 1


def test_faiss_flat_search_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(500, 32, generator=g), torch.randn(700, 32, generator=g)
    got = nearest(queries, build_index(bank, "flat"), chunk=128)
    want = torch.cdist(queries.double(), bank.double()).min(dim=1).values.float()
    assert torch.allclose(got, want, atol=1e-3)
    approx = nearest(queries, build_index(bank, "hnsw"))
    assert (approx >= want - 1e-3).all()  # an approximate index can only miss the nearest row


def test_leave_one_out_never_matches_an_images_own_rows() -> None:
    g = torch.Generator().manual_seed(4)
    features = torch.randn(12, 20, 16, generator=g)
    features[5] = features[5, :1] + 0.01 * torch.randn(20, 16, generator=g)  # image 5: one patch, repeated
    model = PatchKNN(16, bank_fraction=1.0)
    scores = leave_one_out_scores(model, features, torch.Generator().manual_seed(0))
    owners = torch.arange(12).repeat_interleave(20)
    flat = features.reshape(-1, 16)
    brute = torch.cdist(flat.double(), flat.double())
    brute[owners[:, None] == owners[None, :]] = float("inf")
    assert torch.allclose(scores.reshape(-1), brute.min(dim=1).values.float(), atol=1e-3)
    assert float(scores[5].min()) > 0.5  # its own near-copies would have scored ~0.01
    # the search used for it, on its own: a bank row of the query's group is never its neighbour
    got = nearest_excluding(flat, owners, build_index(flat, "flat"), owners)
    assert torch.allclose(got, brute.min(dim=1).values.float(), atol=1e-3)
