"""Data-parallel CoMet training on Ray Train (V2): one category over N workers (many categories
at once: :mod:`comet_ray.distributed.categories`).

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
import os
import signal
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from comet_ray import atomic, storage
from comet_ray.comet.collective import Collective
from comet_ray.config import TrainConfig
from comet_ray.distributed.batchnorm import DataParallelCollective
from comet_ray.distributed.staging import checkpoint_staging, remove_orphaned_staging
from comet_ray.distributed.worker_logs import quiet_worker_logs, say, say_feature_origin, verbose_logs
from comet_ray.errors import CometError
from comet_ray.resume import load_epoch_state, save_epoch_state

ATTEMPTS_FILE = "attempts.jsonl"


ATTEMPTS_DIR = "attempts"


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

    A local run folder is published in one rename (:func:`comet_ray.atomic.publish_folder`; a folder a killed
    publish set aside is recovered first); an S3 one has ``metrics.json`` uploaded last, so with it present
    the rest is there too.
    """
    try:
        if not storage.is_remote(out):
            atomic.recover_folder(out)
        metrics, history = (
            storage.read_text(storage.join(out, name)) for name in ("metrics.json", "history.json")
        )
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

    from comet_ray.pipeline import train_category
    from comet_ray.prepare import prepare_data

    torch.set_num_threads(int(loop_config["torch_threads"]))
    quiet_worker_logs(loop_config["verbose"])
    remove_orphaned_staging()  # left on this node by a worker killed mid-checkpoint
    config = TrainConfig.from_dict(loop_config["train_config"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    collective = (
        DataParallelCollective(device) if dist.is_available() and dist.is_initialized() else Collective()
    )
    trainer_state, history = _restore(ray.train.get_checkpoint())
    start = {
        "rank": rank,
        "world_size": collective.world_size,
        "pid": os.getpid(),
        "start_epoch": int(trainer_state["epoch"]) if trainer_state is not None else 0,
    }
    if start["start_epoch"] >= config.epochs and (
        finished := _complete_outputs(loop_config["out"], config.epochs)
    ):
        return _report_finished(loop_config, start, finished, collective)

    # The driver extracted the features into the cache; this worker reads its shard of every split.
    data = prepare_data(config, device, features=loop_config["features"], collective=collective)
    say_feature_origin(data, f"rank {rank}")
    _record_attempt(loop_config["attempts"], {**start, "feature_bytes": data.feature_bytes})
    reporter = RayTrainReporter(
        data,
        config.precision,
        device,
        collective,
        history,
        loop_config["epoch_callbacks"],
        epochs=config.epochs,
    )
    # Every rank ends with the same model: only rank 0, which writes the results, evaluates it.
    result = train_category(config, data, device, collective, reporter, trainer_state, evaluate=rank == 0)
    if rank == 0:
        _write_results(loop_config, config, data, result, history, start["start_epoch"])
    ray.train.report({"done": True, **_plain(result.metrics)})
    return _plain(result.metrics) if rank == 0 else None  # the driver's Result.return_value


class RayTrainReporter:
    """The per-epoch ``on_epoch_end(trainer, log)`` of a Ray Train worker: the global batch loss, the
    validation AUROC (every worker scores its shard), and one ``ray.train.report`` per epoch, rank 0's
    with the checkpoint (:func:`comet_ray.resume.save_epoch_state`); then ``epoch_callbacks``. Rank 0 prints
    the epoch's one line (as a plain run does); the other ranks print nothing."""

    def __init__(
        self,
        data,
        precision: str,
        device: torch.device,
        collective: Collective,
        history: list[dict],
        epoch_callbacks: list[Callable] | None = None,
        epochs: int | None = None,
    ) -> None:
        self.data, self.precision, self.device, self.collective = data, precision, device, collective
        self.epochs = epochs
        self.history = history  # rank 0: every epoch so far, restored ones included
        self.epoch_callbacks = list(epoch_callbacks or [])

    def __call__(self, trainer, log) -> None:
        import ray.train

        from comet_ray.evaluate import validation_auroc

        # Each rank's loss is its shard's share times world; their mean is the global batch loss.
        loss = self.collective.all_reduce_sum(torch.tensor([log.loss], dtype=torch.float64))
        log.loss = float(loss[0]) / self.collective.world_size
        metrics = {"epoch": log.epoch, "loss": log.loss, "lambda": log.lam, "mean_weight": log.mean_weight}
        auroc = validation_auroc(
            trainer.model,
            self.data.validation,
            self.data.validation_labels,
            self.device,
            self.precision,
            self.collective,
        )
        if self.collective.rank == 0:
            metrics["validation_image_auroc"] = log.extra["validation_image_auroc"] = auroc
            self.history.append(
                {**log.to_dict(), "finished_at": time.time(), "process_cpu_s": time.process_time()}
            )
            if self.epochs is not None:
                say(log.line(self.epochs))
            with checkpoint_staging() as tmp:
                save_epoch_state(tmp, trainer.state_dict(), self.history)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"epoch_{log.epoch:04d}",
                )
        else:
            ray.train.report(metrics)
        for (
            callback
        ) in self.epoch_callbacks:  # after the report: e.g. a test's fault, once the checkpoint is out
            callback(trainer, log)


def _restore(checkpoint) -> tuple[dict | None, list[dict]]:
    """(trainer state, epoch history) of the newest checkpoint; (None, []) on a first start."""
    if checkpoint is None:
        return None, []
    with checkpoint.as_directory() as directory:
        trainer_state, history = load_epoch_state(directory)
    return trainer_state, history or []


def _report_finished(loop_config: dict, start: dict, finished: dict, collective: Collective) -> dict | None:
    """A finished run whose results are already in ``out``: neither retrain nor rewrite them (only
    attempts.jsonl gains this start's lines, once every rank has recorded its own)."""
    import ray.train

    attempts = loop_config["attempts"]
    _record_attempt(attempts, start)
    collective.barrier()
    if start["rank"] == 0:
        storage.write_text(storage.join(loop_config["out"], ATTEMPTS_FILE), _gathered_attempts(attempts))
    ray.train.report({"done": True, "already_complete": True, **_plain(finished)})
    return _plain(finished) if start["rank"] == 0 else None


def _write_results(
    loop_config: dict, config: TrainConfig, data, result, history: list[dict], start_epoch: int
) -> None:
    """Rank 0: the run folder (``out`` itself, or a local folder uploaded to s3:// at the end)."""
    from comet_ray.runfolder import write_run

    result = dataclasses.replace(result, epochs=[_EpochRecord(e) for e in history])
    result.metrics["resumed_from_epoch"] = start_epoch
    with storage.staged(loop_config["out"]) as local:
        write_run(str(local), config, data, result)
        atomic.write_text(local / ATTEMPTS_FILE, _gathered_attempts(loop_config["attempts"]))


class _EpochRecord:
    """A logged epoch (possibly from before a restart) as ``write_run`` wants it: ``to_dict()``."""

    def __init__(self, record: dict) -> None:
        self.record = record

    def to_dict(self) -> dict:
        return dict(self.record)


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
    epoch_callbacks: list[Callable] | None = None,
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
    starts, a run in which a worker would hold more features than that. ``epoch_callbacks``: called in
    every worker as ``callback(trainer, epoch_log)`` after each epoch's report (tests inject faults
    with them, ``tests/support/faults.py``). ``callbacks`` go to ``RunConfig`` (e.g. Tune's ``TuneReportCallback``, which
    forwards the per-epoch reports to the Tune trial that runs this).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from comet_ray.prepare import category_samples, feature_entry, worker_feature_bytes

    scan, samples = category_samples(config)  # a layout error is one line here, not a retried worker crash
    storage_path = storage.check_location(storage_path, "--storage-path")
    split = (
        "" if config.data_seed == config.seed else f"-split{config.data_seed}"
    )  # another split: another run
    run_name = run_name or f"{config.category}-{config.comet.strategy}-seed{config.seed}{split}"
    out = storage.check_location(out or config.out or storage.join(storage_path, run_name, "output"), "--out")
    feature_cache = storage.check_location(
        feature_cache or storage.join(storage_path, "feature_cache"), "--cache-dir"
    )
    nodes = _cluster_nodes()
    storage.require_shared(storage_path, "--storage-path", nodes)  # before any worker starts
    storage.require_shared(out, "--out", nodes)
    storage.require_shared(feature_cache, "--cache-dir", nodes)
    entry, origin = feature_entry(config, feature_cache, engine="ray", samples=samples)
    print(f"features: {origin}", flush=True)
    held = worker_feature_bytes(config, scan, entry, workers)
    if worker_feature_memory is not None and held > worker_feature_memory:
        raise CometError(
            f"a worker would hold {held / 2**20:.1f} MiB of features with {workers} worker(s), over "
            f"the {worker_feature_memory / 2**20:.1f} MiB allowed per worker: use more workers "
            "(each holds 1/N of them)"
        )
    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    loop_config = {
        "train_config": config.to_dict(),
        "out": out,
        "attempts": storage.join(storage_path, run_name, ATTEMPTS_DIR),
        "features": storage.join(feature_cache, entry.path.rsplit("/", 1)[-1]),
        "torch_threads": torch_threads or max(1, int(cpus_per_worker)),
        "epoch_callbacks": list(epoch_callbacks or []),
        "verbose": verbose_logs(),
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
            # Ray Train's INFO lines (every report as a raw TrainingReport, each checkpoint, the worker
            # group's start) only with --verbose; its warnings and errors always.
            logging_config=LoggingConfig(log_level="INFO" if loop_config["verbose"] else "WARNING"),
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
