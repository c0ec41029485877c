"""The kNN memory bank at scale: bank build seconds, scoring images/s and peak RSS, today's exact greedy
against the per-part coreset, and N = 1 / 2 shards (each shard's coreset built in its own process, as a
Ray Train worker builds the coreset of the rows it holds; the merge is the union of their selections).

Random fp16 features, as ``bench/scale.py``: K images x P patches x D dims (default: 771 images x 784
patches x 256 = 604k patches, MobileNetV2-size at 224 px; ``--dim 1536`` for WideResNet-50's width). Each
figure runs in a fresh process (peak RSS is that process's ``ru_maxrss``). The exact greedy is timed over
``--exact-iterations`` bank rows and extrapolated to the whole bank (stated as such). One line per figure.

    python bench/knn_scale.py                      # 604k x 256, 10 % bank
    python bench/knn_scale.py --images 200 --dim 1536
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def features(images: int, patches: int, dim: int, shard: int = 0, shards: int = 1) -> torch.Tensor:
    """The rows of shard ``shard`` of ``shards`` (every N-th image, as Collective.shard_rows), fp16."""
    mine = range(shard, images, shards)
    out = torch.empty(len(mine) * patches, dim, dtype=torch.float16)
    for slot, image in enumerate(mine):  # filled in place: never a second copy of the features
        g = torch.Generator().manual_seed(image)
        out[slot * patches : (slot + 1) * patches] = torch.randn(patches, dim, generator=g)
    return out


def child(args) -> dict:
    from comet_ray.models.coreset import coreset_rows, exact_greedy, project, projection_for
    from comet_ray.models.knn import PatchKNN, nearest_distances

    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Python + torch, before any data
    patches = features(args.images, args.patches, args.dim, args.shard, args.shards)
    size = round(args.fraction * args.images * args.patches / args.shards)
    out = {
        "fp16_bytes": patches.numel() * 2,
        "runtime_rss": runtime,
        "rss_before": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    if args.what == "exact":
        points = project(patches, torch.arange(patches.shape[0]), projection_for(args.dim, 128, g))
        exact_greedy(points, args.exact_iterations, g)
        per_row = (time.perf_counter() - start) / args.exact_iterations
        out["build_s"], out["extrapolated"] = per_row * size, True
    else:
        rows = coreset_rows(patches, size, "fast", g, progress=False)
        out["build_s"] = time.perf_counter() - start
        out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the build's peak
        if args.what == "score":
            bank = patches[rows].float()
            del patches
            queries = torch.randn(args.score_images * args.patches, args.dim, generator=g)
            start = time.perf_counter()
            exact = nearest_distances(queries, bank)
            out["matmul_images_per_s"] = args.score_images / (time.perf_counter() - start)
            for search in ("flat", "hnsw", "ivf"):
                model = PatchKNN(args.dim, search=search).set_bank(bank)
                start = time.perf_counter()
                model.index()
                out[f"{search}_index_s"] = time.perf_counter() - start
                start = time.perf_counter()
                found = model.patch_scores(
                    queries.reshape(args.score_images, args.patches, args.dim)
                ).flatten()
                out[f"{search}_images_per_s"] = args.score_images / (time.perf_counter() - start)
                # how far the approximate search's distances are above the exact ones (0 for flat)
                out[f"{search}_excess"] = float(((found - exact).clamp_min(0) / exact.clamp_min(1e-6)).mean())
    return out


def run(argv: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=771)
    parser.add_argument("--patches", type=int, default=784)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--exact-iterations", type=int, default=200)
    parser.add_argument("--score-images", type=int, default=8)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--what", default="build")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    common = [
        "--images",
        str(args.images),
        "--patches",
        str(args.patches),
        "--dim",
        str(args.dim),
        "--fraction",
        str(args.fraction),
        "--exact-iterations",
        str(args.exact_iterations),
        "--score-images",
        str(args.score_images),
    ]
    n = args.images * args.patches
    print(
        f"knn_scale: {args.images} images x {args.patches} patches x {args.dim} = {n} patches, "
        f"{args.fraction:.0%} bank ({round(args.fraction * n)} rows), {torch.get_num_threads()} threads",
        flush=True,
    )
    exact = run([*common, "--what", "exact"])
    print(
        f"exact greedy build (today's; extrapolated from {args.exact_iterations} rows): {exact['build_s']:.0f} s",
        flush=True,
    )
    one = run([*common, "--what", "score"])
    print(
        f"fast coreset build, N=1: {one['build_s']:.1f} s ({exact['build_s'] / one['build_s']:.0f}x faster)",
        flush=True,
    )
    data = one["peak_rss"] - one["runtime_rss"]
    print(
        f"fast coreset peak RSS, N=1: {one['peak_rss'] / 2**30:.2f} GiB; above the Python + torch runtime "
        f"({one['runtime_rss'] / 2**30:.2f} GiB, no data): {data / 2**30:.2f} GiB = "
        f"{data / one['fp16_bytes']:.2f}x the fp16 features ({one['fp16_bytes'] / 2**30:.2f} GiB; the build's own "
        f"memory {(one['peak_rss'] - one['rss_before']) / one['fp16_bytes']:.2f}x)",
        flush=True,
    )
    for search in ("flat", "hnsw", "ivf"):
        rate = one[f"{search}_images_per_s"]
        print(
            f"scoring at the same bank, faiss {search}: {rate:.2f} images/s vs today's matmul "
            f"{one['matmul_images_per_s']:.2f} ({rate / one['matmul_images_per_s']:.1f}x; index {one[f'{search}_index_s']:.1f} s, "
            f"distances {one[f'{search}_excess']:.1%} above exact on average)",
            flush=True,
        )
    shards = [run([*common, "--what", "build", "--shards", "2", "--shard", str(s)]) for s in range(2)]
    worst = max(s["peak_rss"] for s in shards)
    worst_data = max(s["peak_rss"] - s["runtime_rss"] for s in shards)
    print(
        f"fast coreset build, N=2: {max(s['build_s'] for s in shards):.1f} s per shard (slowest), "
        f"peak RSS {worst / 2**30:.2f} GiB per worker = {worst / one['peak_rss']:.2f}x N=1; above the runtime "
        f"{worst_data / 2**30:.2f} GiB = {worst_data / data:.2f}x N=1",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
