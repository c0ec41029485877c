"""Data-parallel CoMet training on Ray Train (V2): one category over N workers, many categories at once.

Before any worker starts, the driver makes sure the category's features are in the shared feature
cache: the frozen backbone runs as a Ray Data job over every node (``features/streaming.py``: GPU actors
where there are GPUs), whose actors write the entry's parts into the cache themselves; a later run
finds the entry and extracts nothing. Each worker then reads only its shard of every split from there
(``Collective.shard_rows``: every N-th image), so it holds 1/N of the features.

Why shards read from the cache and not Ray Train's ``datasets=`` / ``get_dataset_shard``: CoMet visits
a worker's images many times per epoch (the SCL scoring pass, meta tasks drawn by weight, ``passes``
shuffled main passes), so a worker must hold its shard, not stream it once; and Ray Data's streaming
split hands blocks to whichever worker asks first, so which images a worker gets would change from run
to run and restart to restart, while here it is a function of (rank, N) alone: draws stay keyed by
sample and a restarted group resumes on the same shards. Reading the rows straight from the entry
costs each worker 1/N of the bytes, in S3 as on disk.

The epoch loop is the core's ``CometTrainer`` (through ``pipeline.train_category``) with a
``torch.distributed`` collective; Ray only starts the workers, sets up the process group, keeps
checkpoints and restarts a failed worker group from the newest one. One worker computes what one
process computes (the test compares them); N > 1 workers each take ``batch_size`` images per step from
their own shard, so the global batch is N times larger and the sample path differs (their quality is
compared instead; the learning rates follow ``lr_scaling``). BatchNorm statistics are synchronised over
the global batch. (SimpleNet has no pre-BatchNorm biases: they would get pure rounding-noise gradients
that Adam turns into +-lr steps.)

Layout of a run (``storage_path/run_name``) is Ray's; the results (metrics.json, weights.json, ...)
are written by rank 0 with ``runfolder.write_run`` into ``out``, plus ``attempts.jsonl``: one line per
worker start (rank, epoch it resumed at), which shows what a restart redid. On a cluster the nodes
share no disk, so everything several nodes use lives where all of them reach it: checkpoints under
``storage_path``, the feature cache (default ``storage_path/feature_cache``), each worker start's
record (``storage_path/run_name/attempts/``, gathered into ``attempts.jsonl`` by rank 0) and ``out``,
which may be ``s3://``: rank 0 then puts the results together in a local folder and uploads them
once they are complete. The driver takes the final metrics from Ray's ``Result`` (rank 0's return
value), not from a file on its own disk. Local folders on a cluster of several nodes are refused
before any worker starts (:func:`comet_ray.storage.require_shared`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from comet_ray import jsonfile, storage
from comet_ray.comet.collective import Collective, TorchDistributedCollective
from comet_ray.config import TrainConfig
from comet_ray.distributed.staging import checkpoint_staging, remove_orphaned_staging
from comet_ray.errors import CometError

STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"
ATTEMPTS_FILE = "attempts.jsonl"
ATTEMPTS_DIR = "attempts"


# --------------------------------------------------------------------------- cross-worker BatchNorm
_sync_state = threading.local()


@contextmanager
def _synchronised_statistics():
    previous = getattr(_sync_state, "active", False)
    _sync_state.active = True
    try:
        yield
    finally:
        _sync_state.active = previous


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a summed statistic is the summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class CrossWorkerBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of every worker (CPU/gloo).

    Why not ``nn.SyncBatchNorm``: in this torch (2.14) ``DistributedDataParallel`` refuses a module that
    contains ``SyncBatchNorm`` unless it is on a GPU ("SyncBatchNorm layers only work with GPU
    modules"), so CPU data-parallel runs (tests, CPU clusters) need their own. SimpleNet's
    discriminator normalises the true and fake patches of a whole batch together; with the batch
    sharded over workers, plain BatchNorm would normalise each shard by its own statistics and N
    workers would no longer compute what one process computes.

    Forward in training mode, inside the data-parallel wrapper only: all-reduce (per-channel sum,
    row count), then all-reduce the per-channel sum of squared deviations from the global mean (two
    passes, numerically like the single-process kernel), normalise with the biased variance, and move
    the running statistics with the unbiased one, as ``BatchNorm1d`` does. Both all-reduces are
    differentiable, so gradients through the statistics are exact too.

    It synchronises only while a forward runs through ``SyncingDistributedDataParallel`` (the main
    phase, where every rank runs the same steps in lockstep). The meta phase's private copies
    (``CometTrainer._local_copy``) and evaluation call the module directly, on one rank's tasks only,
    and so must not enter a collective: there it is plain BatchNorm1d.
    """

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> CrossWorkerBatchNorm:
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        tensors = [*bn.parameters(), *bn.buffers()]
        return new.to(tensors[0].device) if tensors else new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training
            and getattr(_sync_state, "active", False)
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local_count = x.numel() // max(x.shape[1], 1)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([float(local_count)])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply(centered.square().sum(dims)) / count
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                tracked = float(self.num_batches_tracked)
                momentum = self.momentum if self.momentum is not None else 1.0 / tracked
                n = float(count)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d in ``module`` by ``CrossWorkerBatchNorm`` in place (root included)."""
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, CrossWorkerBatchNorm):
        return CrossWorkerBatchNorm.from_batchnorm(module)
    for name, child in list(module.named_children()):
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


class SyncingDistributedDataParallel(DistributedDataParallel):
    """DDP whose forward switches ``CrossWorkerBatchNorm`` to cross-worker statistics."""

    def forward(self, *args, **kwargs):
        with _synchronised_statistics():
            return super().forward(*args, **kwargs)


class DataParallelCollective(TorchDistributedCollective):
    """``TorchDistributedCollective`` that makes BatchNorm cross-worker before wrapping in DDP.

    The conversion happens in ``wrap_model``, i.e. inside ``CometTrainer.__init__`` before the
    optimisers are built and before any state is loaded, and mutates the model in place, so the model
    ``train_category`` evaluates and saves is the converted one (same state-dict keys as plain
    BatchNorm, so saved detectors load as plain SimpleNet). On CUDA it uses ``nn.SyncBatchNorm``
    (which the core's ``_local_copy`` already turns back into plain BatchNorm for the meta phase).
    """

    def wrap_model(self, module: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        if self.world_size <= 1:
            return module  # nothing to average: DDP's per-step bucket copies would be pure cost
        if self.device.type == "cuda":
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            if converted is not module:  # only when the root itself is a BatchNorm
                raise ValueError("the detector's root module must not be a BatchNorm layer")
            return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
        if convert_batchnorm(module) is not module:
            raise ValueError("the detector's root module must not be a BatchNorm layer")
        return SyncingDistributedDataParallel(module, device_ids=None, forward_sync_buffers=False)


# --------------------------------------------------------------------------- the per-worker loop
def _record_attempt(attempts: str, record: dict) -> None:
    """One file per worker start under ``attempts`` (shared storage: every node's starts end up together)."""
    name = f"{time.time_ns():020d}-rank{record['rank']}-{os.getpid()}.json"
    storage.write_text(storage.join(attempts, name), json.dumps(record))


def _gathered_attempts(attempts: str) -> str:
    """Every recorded worker start, oldest first, as the lines of ``attempts.jsonl``."""
    names = [n for n in storage.list_names(attempts) if n.endswith(".json")]
    return "".join(storage.read_text(storage.join(attempts, n)).strip() + "\n" for n in names)


def _complete_outputs(out: str, epochs: int) -> dict | None:
    """The metrics in ``out`` when it holds the results of a run of ``epochs`` epochs (else None).

    ``metrics.json`` is written (and uploaded) last, so with it present the rest is there too.
    """
    try:
        metrics, history = (storage.read_text(storage.join(out, name)) for name in ("metrics.json", "history.json"))
        if metrics is not None and history is not None and len(json.loads(history)) == epochs:
            return json.loads(metrics)
    except (OSError, ValueError, CometError):
        pass
    return None


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str, bool))}


def train_loop_per_worker(loop_config: dict) -> None:
    """One worker of a data-parallel CoMet run (``TorchTrainer``'s train function)."""
    import ray.train
    import ray.train.torch

    from comet_ray.comet.trainer import EpochLog
    from comet_ray.evaluate import validation_auroc
    from comet_ray.pipeline import prepare_data, train_category
    from comet_ray.runfolder import write_run

    torch.set_num_threads(int(loop_config["torch_threads"]))
    remove_orphaned_staging()  # left on this node by a worker killed mid-checkpoint
    config = TrainConfig.from_dict(loop_config["train_config"])
    out = loop_config["out"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    collective: Collective = (
        DataParallelCollective(device) if dist.is_available() and dist.is_initialized() else Collective()
    )

    trainer_state, history = None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer_state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
            history_path = Path(directory) / HISTORY_FILE
            if history_path.exists():
                history = json.loads(history_path.read_text())
    start_epoch = int(trainer_state["epoch"]) if trainer_state is not None else 0
    attempts = loop_config["attempts"]
    start = {"rank": rank, "world_size": world, "start_epoch": start_epoch, "pid": os.getpid()}

    finished = _complete_outputs(out, config.epochs) if start_epoch >= config.epochs else None
    if finished is not None:
        _record_attempt(attempts, start)
        # A finished run whose results are already in ``out``: neither retrain nor rewrite them
        # (only attempts.jsonl gains this start's lines, once every rank has recorded its own).
        collective.barrier()
        if rank == 0:
            storage.write_text(storage.join(out, ATTEMPTS_FILE), _gathered_attempts(attempts))
        ray.train.report({"done": True, "already_complete": True, **_plain(finished)})
        return _plain(finished) if rank == 0 else None

    # The driver extracted the features into the cache; this worker reads its shard of every split.
    data = prepare_data(config, device, features=loop_config["features"], collective=collective)
    say_feature_origin(data, f"rank {rank}")
    _record_attempt(attempts, {**start, "feature_bytes": data.feature_bytes})

    kill_at = loop_config.get("kill_at_epoch")
    kill_rank = int(loop_config.get("kill_rank", 0))
    kill_marker = loop_config.get("kill_marker")

    def on_epoch_end(trainer, log: EpochLog) -> None:
        # Each rank's loss is its shard's share times world; their mean is the global batch loss.
        loss = collective.all_reduce_sum(torch.tensor([log.loss], dtype=torch.float64))
        log.loss = float(loss[0]) / collective.world_size
        metrics = {"epoch": log.epoch, "loss": log.loss, "lambda": log.lam, "mean_weight": log.mean_weight}
        # Every worker scores its shard of the validation split; rank 0 reports.
        auroc = validation_auroc(trainer.model, data.validation, data.validation_labels, device, config.precision,
                                 collective)
        if rank == 0:
            metrics["validation_image_auroc"] = log.extra["validation_image_auroc"] = auroc
            history.append({**log.to_dict(), "finished_at": time.time(), "process_cpu_s": time.process_time()})
            with checkpoint_staging() as tmp:
                torch.save(trainer.state_dict(), Path(tmp) / STATE_FILE)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"epoch_{log.epoch:04d}",
                )
        else:
            ray.train.report(metrics)
        if kill_at is not None and log.epoch == int(kill_at) and rank == kill_rank:
            if kill_marker and not os.path.exists(kill_marker):
                # Wait until the controller has registered this epoch's checkpoint, so the restart
                # resumes from it (a report still queued in the dying process would be lost).
                ray.train.get_all_reported_checkpoints(timeout_s=120)
                Path(kill_marker).write_text(f"killed rank {rank} at epoch {log.epoch}\n")
                os.kill(os.getpid(), signal.SIGKILL)

    # Every rank ends with the same model: only rank 0, which writes the results, evaluates it.
    result = train_category(config, data, device, collective, on_epoch_end, trainer_state, evaluate=rank == 0)
    if rank == 0:
        result = dataclasses.replace(result, epochs=[_EpochRecord(e) for e in history])
        result.metrics["resumed_from_epoch"] = start_epoch
        with storage.staged(out) as local:  # out itself, or a local folder uploaded to s3:// at the end
            write_run(str(local), config, data, result)
            (local / ATTEMPTS_FILE).write_text(_gathered_attempts(attempts))
    ray.train.report({"done": True, **_plain(result.metrics)})
    return _plain(result.metrics) if rank == 0 else None  # the driver's Result.return_value


def say_feature_origin(data, who: str) -> None:
    """One line in the worker's output (and its node's logs): did this process extract or read the features?"""
    if data.feature_origin:
        print(f"[{who}] features: {data.feature_origin}", flush=True)


class _EpochRecord:
    """A logged epoch (possibly from before a restart) as ``write_run`` wants it: ``to_dict()``."""

    def __init__(self, record: dict) -> None:
        self.record = record

    def to_dict(self) -> dict:
        return dict(self.record)


# --------------------------------------------------------------------------- driver side
def fit_distributed(
    config: TrainConfig,
    workers: int = 2,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 0.5,
    *,
    storage_path: str,
    run_name: str | None = None,
    num_to_keep: int = 2,
    max_failures: int = 2,
    feature_cache: str | None = None,
    out: str | None = None,
    torch_threads: int | None = None,
    callbacks: list | None = None,
    worker_feature_memory: int | None = None,
    **extra_loop_config: Any,
) -> dict:
    """Train ``config`` data-parallel over ``workers`` Ray Train workers; returns the final metrics.

    A checkpoint (trainer state + epoch history) is reported every epoch; ``max_failures`` worker-group
    failures are recovered from the newest one. Calling again with the same ``storage_path`` and
    ``run_name`` resumes that run from its newest checkpoint (a finished run is not retrained; its
    results are re-evaluated only when ``out`` lacks them).
    ``feature_cache`` defaults to ``storage_path/feature_cache``; ``out`` (a local folder or ``s3://``)
    to ``config.out`` or ``storage_path/run_name/output``. The features are extracted into the cache
    (a Ray Data job over the cluster) unless they are there already. ``torch_threads`` (per worker)
    defaults to the worker's whole CPUs. ``worker_feature_memory`` (bytes): refuse, before any worker
    starts, a run in which a worker would hold more features than that. ``extra_loop_config`` goes
    to the train function unchanged (e.g. the test hooks ``kill_at_epoch``, ``kill_rank``,
    ``kill_marker``). ``callbacks`` go to ``RunConfig`` (e.g. Tune's ``TuneReportCallback``, which
    forwards the per-epoch reports to the Tune trial that runs this).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from comet_ray.pipeline import category_samples, feature_entry, worker_feature_bytes

    scan, samples = category_samples(config)  # a layout error is one line here, not a retried worker crash
    storage_path = storage.check_location(storage_path, "--storage-path")
    split = "" if config.data_seed == config.seed else f"-split{config.data_seed}"  # another split: another run
    run_name = run_name or f"{config.category}-{config.comet.strategy}-seed{config.seed}{split}"
    out = storage.check_location(out or config.out or storage.join(storage_path, run_name, "output"), "--out")
    feature_cache = storage.check_location(feature_cache or storage.join(storage_path, "feature_cache"),
                                           "--cache-dir")
    nodes = _cluster_nodes()
    storage.require_shared(storage_path, "--storage-path", nodes)  # before any worker starts
    storage.require_shared(out, "--out", nodes)
    storage.require_shared(feature_cache, "--cache-dir", nodes)
    entry, origin = feature_entry(config, feature_cache, engine="ray", samples=samples)
    print(f"features: {origin}", flush=True)
    held = worker_feature_bytes(config, scan, entry, workers)
    if worker_feature_memory is not None and held > worker_feature_memory:
        raise CometError(f"a worker would hold {held / 2**20:.1f} MiB of features with {workers} worker(s), over "
                         f"the {worker_feature_memory / 2**20:.1f} MiB allowed per worker: use more workers "
                         "(each holds 1/N of them)")
    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    loop_config = {
        "train_config": config.to_dict(),
        "out": out,
        "attempts": storage.join(storage_path, run_name, ATTEMPTS_DIR),
        "features": storage.join(feature_cache, entry.path.rsplit("/", 1)[-1]),
        "torch_threads": torch_threads or max(1, int(cpus_per_worker)),
        **extra_loop_config,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
    )
    # Called from the main thread, TorchTrainer.fit installs a SIGINT handler (abort the run) that
    # holds the controller actor's handle and outlives fit: the finished controller (and the Ray Data
    # DatasetManager it owns) stay alive until the next fit or ray.shutdown (seen by bench/soak.py),
    # and the next Ctrl-C in this process are swallowed. Restoring the previous handler releases them.
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        result = trainer.fit()
    finally:
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
    metrics = dict(result.return_value or {})  # rank 0's metrics, wherever it ran
    metrics["out"] = out
    metrics["run_name"] = run_name
    return metrics


def _cluster_nodes() -> int:
    import ray

    from comet_ray.distributed.resources import cluster_nodes

    return cluster_nodes() if ray.is_initialized() else 1


def format_table(rows: list[dict]) -> str:
    """A plain-text table of per-category results."""
    columns = ("category", "strategy", "image_auroc", "pixel_auroc", "f1_max", "train_seconds")
    if any("error" in row for row in rows):
        columns += ("error",)
    cells = [[c for c in columns]]
    for row in rows:
        cells.append(
            [_cell(row, c) for c in columns]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(row: dict, column: str) -> str:
    value = row.get(column, "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # undefined (one class of test image): null in metrics.json
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def error_line(exc: BaseException) -> str:
    """One line for a category's failure: a user error's own message, even from inside a worker.

    Ray wraps a worker's exception in ``WorkerGroupError`` whose text is the whole remote traceback;
    its last ``comet_ray.errors.<Name>: message`` line is what the user can act on.
    """
    if isinstance(exc, CometError):
        return str(exc)
    text = str(exc)
    found = re.findall(r"comet_ray\.errors\.\w+: (.+)", text)
    if found:
        return found[-1].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}".rstrip(": ")


def fit_categories(
    configs: list[TrainConfig],
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 0.5,
    *,
    storage_path: str,
    summary_path: str | None = None,
    **fit_kwargs: Any,
) -> tuple[list[dict], str]:
    """Train many categories at once: one ``fit_distributed`` per category, each from a Ray task.

    Each category's run name is the default of ``fit_distributed`` (category-strategy-seed) and its
    outputs go to ``config.out`` (or the run's ``output`` folder). The tasks take no CPU themselves
    (each only drives a ``TorchTrainer``); Ray queues trainers whose workers don't fit yet. Writes
    ``summary.json`` (default ``storage_path/summary.json``) and returns (metrics in the order of
    ``configs``, a printable table). A category that fails is reported with its error instead of
    failing the others.
    """
    import ray

    storage_path = storage.check_location(storage_path, "--storage-path")
    nodes = _cluster_nodes()
    storage.require_shared(storage_path, "--storage-path", nodes)  # before any category starts
    for config in configs:
        if config.out:
            storage.require_shared(storage.check_location(config.out, "--out"), "--out", nodes)

    @ray.remote(num_cpus=0, max_retries=0)
    def _fit_one(config_dict: dict) -> dict:
        config = TrainConfig.from_dict(config_dict)
        try:
            return fit_distributed(
                config, workers, gpus_per_worker, cpus_per_worker, storage_path=storage_path, **fit_kwargs
            )
        except Exception as exc:  # noqa: BLE001 - one category's failure must not sink the rest
            return {"category": config.category, "strategy": config.comet.strategy, "error": error_line(exc)}

    results = ray.get([_fit_one.remote(c.to_dict()) for c in configs])
    storage.write_text(summary_path or storage.join(storage_path, "summary.json"), jsonfile.dumps(results, indent=2))
    return results, format_table(results)
