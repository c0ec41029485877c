"""The CoMet epoch loop in plain PyTorch: score -> fence -> weights -> meta phase -> main phase.

Model-agnostic: it only talks to the detector protocol (``forward`` = per-patch losses, ``patch_scores``,
``regularised_parameters``, ``make_optimizers``). Data-parallel training runs this same loop with a
``torch.distributed`` collective (see ``comet_ray.distributed.train``): each of N workers holds a shard
of the training images (``Collective.shard_rows``), scores it, and takes its main-phase batches and its
share of the meta tasks from it; the image scores are gathered so the fence is global, the weights,
the meta directions and the (L_tr, L_val) pair are the same on every worker, and DDP averages the
gradients. Scaling rule: the per-worker batch stays ``batch_size``, so the global batch is N times it
and an epoch takes 1/N of the steps; the learning rates follow ``lr_scaling`` (:func:`lr_scale`).

Every random draw is a pure function of (seed, epoch, phase, step, worker, sample row): batch order,
task sampling and each sample's synthetic noise (keyed by the sample alone, so it is the same on any
worker). That makes a run resumable from any epoch without RNG state, and one worker compute exactly
what one process computes; N > 1 workers compose different batches (each from its shard), so they
follow the same method on a different sample path, not the same numbers.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from comet_ray.comet import schedule
from comet_ray.comet.collective import Collective
from comet_ray.comet.confidence import confidence_weights, weight_histogram
from comet_ray.comet.meta import (
    CovarianceHistory,
    covariance_lambda,
    l2_penalty,
    parameter_vector,
    reptile_step,
    sample_tasks,
    split_task,
)
from comet_ray.config import TrainConfig, use_bf16
from comet_ray.features.store import FeatureStore
from comet_ray.models.anomaly_map import topk_mean
from comet_ray.models.protocol import Detector
from comet_ray.models.scoring import score_rows

_MASK = (1 << 62) - 1
logger = logging.getLogger(__name__)
# The learning check: from this epoch on, a detector whose separation of true from synthetic-anomaly
# patches stays below this (0.5 = chance) is reported as not learning.
NOT_LEARNING_AFTER = 5
NOT_LEARNING_BELOW = 0.6


def mix_seed(*parts: int) -> int:
    """A deterministic 62-bit seed from integers (splitmix-style), so seeds of nearby runs don't collide."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & _MASK)) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        value ^= value >> 31
    return value & _MASK


LR_SCALING = ("none", "sqrt", "linear")


def lr_scale(rule: str, workers: int) -> float:
    """The factor on every learning rate when the global batch is ``workers`` per-worker batches.

    "sqrt" (the default): Adam's update size barely depends on the batch, while the gradient noise falls
    as 1/sqrt(batch), so the square root keeps the noise per unit of progress; "linear" is the SGD
    rule; "none" keeps the single-process rates (and so takes N times fewer, steadier steps per epoch).
    """
    if rule not in LR_SCALING:
        raise ValueError(f"unknown lr_scaling {rule!r}; choose one of {', '.join(LR_SCALING)}")
    return {"none": 1.0, "sqrt": math.sqrt(workers), "linear": float(workers)}[rule]


@dataclass
class EpochLog:
    epoch: int
    loss: float
    lam: float
    det_sigma: float
    fence: float
    mean_weight: float
    low_confidence: int
    weight_histogram: list[int]
    mean_weight_injected: float | None
    mean_weight_nominal: float | None
    meta_l_tr: float | None
    meta_l_val: float | None
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self, total_epochs: int) -> str:
        parts = [
            f"epoch {self.epoch + 1:>3}/{total_epochs}",
            f"loss {self.loss:.4f}",
            f"lambda {self.lam:.2e}",
            f"w<1: {self.low_confidence:>3} (mean w {self.mean_weight:.3f})",
        ]
        if self.mean_weight_injected is not None:
            parts.append(f"w injected {self.mean_weight_injected:.3f} vs rest {self.mean_weight_nominal:.3f}")
        parts.extend(f"{k} {v:.4f}" for k, v in self.extra.items() if isinstance(v, float))
        parts.extend(v for v in self.extra.values() if isinstance(v, str))
        parts.append(f"{self.seconds:.1f}s")
        return " | ".join(parts)


class CometTrainer:
    """Trains one detector on one category's cached training features with a CoMet strategy.

    ``train_store`` lists every training image; it holds the features of this worker's shard at least
    (all of them in one process). Weights, scores and the audit record cover every image on every worker.
    """

    def __init__(
        self,
        model: Detector,
        train_store: FeatureStore,
        config: TrainConfig,
        device: torch.device | str = "cpu",
        collective: Collective | None = None,
        injected_ids: set[str] | None = None,
    ) -> None:
        schedule.check_experiment_knobs(config)
        self.config = config
        self.comet = config.comet
        self.device = torch.device(device)
        self.collective = collective or Collective()
        self.store = train_store
        self.model = model.to(self.device)
        self.train_module = self.collective.wrap_model(self.model)
        world = self.collective.world_size
        self.optimizers = self.model.make_optimizers(lr_scale(config.lr_scaling, world))
        n = len(train_store)
        if n == 0:
            raise ValueError("no training images")
        self.rows = self.collective.shard_rows(n)  # the training rows this worker holds and trains on
        self.shard_sizes = self.collective.shard_sizes(n)
        if min(self.shard_sizes) == 0:
            raise ValueError(f"{n} training images cannot be shared by {world} workers")
        if train_store.held is not None and not torch.equal(train_store.held, self.rows):
            raise ValueError("the training store holds another shard than this worker's")
        # Every worker takes the same number of steps per pass; the global batch of each is the sum of theirs.
        self.global_batch = [sum(sizes) for sizes in zip(*(self._batch_sizes(r) for r in range(world)))]
        self.passes = schedule.passes_per_epoch(
            config.passes, config.min_steps, config.epochs, len(self.global_batch)
        )
        self.sample_weights = torch.ones(n)
        self.patch_weights: torch.Tensor | None = None
        # Every epoch's weights, one [N] row per epoch in store order: what ``comet-ray audit`` reads
        # (when each image fell below 1, its trajectory). Part of the state, so a resumed run has them all.
        self.weight_history: list[torch.Tensor] = []
        self.history = CovarianceHistory(self.comet.window)
        self.lam = self.comet.lambda0 if self.comet.uses_meta else 0.0
        self.det_sigma = 0.0
        self.epoch = 0
        self.last_scores = torch.zeros(n)
        self._knn_scores: torch.Tensor | None = None
        injected_ids = injected_ids or set()
        self.injected = torch.tensor([i in injected_ids for i in train_store.ids], dtype=torch.bool)
        self.autocast = use_bf16(config.precision, self.device.type)

    # ------------------------------------------------------------------ helpers
    def _generator(self, *phase: int) -> torch.Generator:
        """The generator of one draw of this epoch; each of several workers has its own (one process
        draws as it always has, so single-process runs are reproducible across versions)."""
        worker = (self.collective.rank,) if self.collective.world_size > 1 else ()
        return torch.Generator().manual_seed(mix_seed(self.config.seed, self.epoch, *phase, *worker))

    def _sample_seeds(self, rows: torch.Tensor, *phase: int) -> torch.Tensor:
        return torch.tensor([mix_seed(self.config.seed, self.epoch, *phase, int(r)) for r in rows])

    def _weighted_loss(
        self, module: nn.Module, rows: torch.Tensor, normaliser: int, *phase: int
    ) -> torch.Tensor:
        """sum_i w_i * mean_p(L_ip) / normaliser (or per-patch weights when ``patch_weighting``)."""
        features = self.store.batch(rows, self.device)
        seeds = self._sample_seeds(rows, *phase)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            losses = module(features, seeds)  # [b, P]
        if self.patch_weights is not None:
            per_sample = (losses * self.patch_weights[rows].to(losses.device)).mean(dim=1)
        else:
            per_sample = losses.mean(dim=1) * self.sample_weights[rows].to(losses.device)
        return per_sample.sum() / normaliser

    def _regularisation(self, module: nn.Module) -> torch.Tensor | float:
        if self.lam <= 0:
            return 0.0
        parameters = module.regularised_parameters(self.comet.l2_include_norm_and_bias)
        return self.lam * l2_penalty(parameters, self.comet.l2_normalisation)

    def _batch_sizes(self, rank: int) -> list[int]:
        """Batch sizes of one pass of worker ``rank``: ``batch_size`` each, as many steps on every worker
        (those of the smallest shard; a larger shard's extra row joins its last batch), and a short tail
        merged into the previous batch (never a near-empty batch)."""
        smallest, size = min(self.shard_sizes), self.config.batch_size
        sizes = [size] * (smallest // size) + ([smallest % size] if smallest % size else [])
        if len(sizes) > 1 and sizes[-1] < max(1, size // 2):
            sizes[-2] += sizes.pop()
        sizes[-1] += self.shard_sizes[rank] - smallest
        return sizes

    def _batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """This worker's batches of one pass: its rows, shuffled."""
        order = self.rows[torch.randperm(self.rows.numel(), generator=generator)]
        return list(order.split(self._batch_sizes(self.collective.rank)))

    # ------------------------------------------------------------------ phases
    def score_training_set(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image scores [N], patch scores [N, P] or None) of every training image under the current model.

        Each worker scores its shard; the image scores are gathered from every worker (the patch scores
        too, only when SCL weights patches: then the fence is over every patch).
        """
        n = len(self.store)
        patch = score_rows(self.model, self.store, self.rows, self.device, self.config.precision)
        if self.comet.patch_weighting:
            patch = self.collective.gather_rows(patch, n).cpu()
            return topk_mean(patch, self.comet.top_k), patch
        return self.collective.gather_rows(topk_mean(patch, self.comet.top_k), n).cpu(), None

    def confidence_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores, patch scores) that SCL weighs by: the current model's (the paper's definition) or,
        with ``confidence_signal="knn"``, each image's leave-one-out knn score (computed once: it does not
        change), which never trusts a model on the images it was trained on."""
        signal = self.comet.confidence_signal
        if signal == "model":
            return self.score_training_set()
        if signal != "knn":
            raise ValueError(f"unknown confidence signal {signal!r}; choose model or knn")
        if self._knn_scores is None:
            if self.store.held is not None:
                raise ValueError(
                    "confidence_signal=knn compares every training image with every other one: "
                    "it needs the whole training set in one worker (use one worker)"
                )
            from comet_ray.models.knn import PatchKNN, leave_one_out_scores

            knn = PatchKNN(
                self.store.dim,
                bank_fraction=self.config.model.knn_bank_fraction,
                coreset=self.config.model.knn_coreset,
                search=self.config.model.knn_search,
            )
            generator = torch.Generator().manual_seed(mix_seed(self.config.seed, 13))
            self._knn_scores = leave_one_out_scores(knn, self.store.features.cpu(), generator)
        return topk_mean(self._knn_scores, self.comet.top_k), self._knn_scores

    def update_weights(self, image_scores: torch.Tensor, patch_scores: torch.Tensor) -> float:
        """Refresh SCL weights from this epoch's scores; returns the fence (nan while unweighted)."""
        c = self.comet
        if c.oracle_weights:
            self.sample_weights, self.patch_weights = schedule.oracle_weights(self.injected), None
            return float("nan")
        if not c.uses_scl or self.epoch < c.warmup_epochs:
            self.sample_weights = torch.ones(len(self.store))
            self.patch_weights = None
            return float("nan")
        if c.patch_weighting:
            weights, fence = confidence_weights(
                patch_scores, c.fence_k, c.weight_form, c.temperature_scale, c.weight_floor
            )
            self.patch_weights = weights
            self.sample_weights = weights.mean(dim=1)
        else:
            self.sample_weights, fence = confidence_weights(
                image_scores, c.fence_k, c.weight_form, c.temperature_scale, c.weight_floor
            )
        return fence.tau

    def meta_phase(self) -> tuple[float, float]:
        """Tasks ∝ weights, inner steps on copies, Reptile step, and lambda(Sigma) with this epoch's pair.

        Worker r runs tasks r, r + N, ... of the M, each drawn from its own shard ∝ the weights there.
        """
        c = self.comet
        rank, world = self.collective.rank, self.collective.world_size
        generator = self._generator(7)
        mine = range(rank, c.meta_tasks, world)
        local = sample_tasks(self.sample_weights[self.rows], len(mine), c.task_size, generator)
        theta = parameter_vector(self.model)
        direction_sum = torch.zeros_like(theta)
        pairs = torch.zeros(c.meta_tasks, 2, dtype=torch.float64)
        for m, task in zip(mine, local):
            support, query = split_task(self.rows[task], c.query_fraction)
            learner = self._local_copy()
            optimiser = torch.optim.Adam(learner.parameters(), lr=c.inner_lr)
            with torch.no_grad():
                l_tr = self._weighted_loss(learner, support, support.numel(), 1000 + m, 0)
            for step in range(c.inner_steps):
                optimiser.zero_grad(set_to_none=True)
                loss = self._weighted_loss(learner, support, support.numel(), 1000 + m, step)
                (loss + self._regularisation(learner)).backward()
                optimiser.step()
            with torch.no_grad():
                l_val = self._weighted_loss(learner, query, query.numel(), 2000 + m, 0)
            direction_sum += parameter_vector(learner) - theta
            pairs[m] = torch.tensor([float(l_tr), float(l_val)], dtype=torch.float64)
        direction_sum = self.collective.all_reduce_sum(direction_sum)
        pairs = self.collective.all_reduce_sum(pairs)
        if c.reptile_step > 0:
            reptile_step(self.model, direction_sum / c.meta_tasks, c.reptile_step)
        # One pair per epoch: the mean over every task of every worker, so all ranks hold the same window.
        l_tr, l_val = pairs.mean(dim=0).tolist()
        self.history.append(l_tr, l_val)
        self.det_sigma = self.history.determinant()
        self.lam = covariance_lambda(self.det_sigma, c.lambda0, c.gamma, c.det_clip)
        return l_tr, l_val

    def _local_copy(self) -> nn.Module:
        """A private copy for inner steps: plain BatchNorm, so no collective is entered on one rank only."""
        learner = copy.deepcopy(self.model)
        for name, module in list(learner.named_modules()):
            if isinstance(module, nn.SyncBatchNorm):
                plain = nn.BatchNorm1d(module.num_features, module.eps, module.momentum, module.affine)
                plain.load_state_dict(module.state_dict())
                parent = learner.get_submodule(name.rsplit(".", 1)[0]) if "." in name else learner
                setattr(parent, name.rsplit(".", 1)[-1], plain.to(self.device))
        return learner.train()

    def main_phase(self) -> float:
        """``passes`` passes over the training set minimising the weighted loss + lambda * ||W||^2."""
        world = self.collective.world_size
        total = torch.zeros((), device=self.device)
        count = 0
        self.model.train()
        for pass_index in range(self.passes):
            generator = self._generator(3, pass_index)
            for step, batch in enumerate(self._batches(generator)):
                for optimiser in self.optimizers:
                    optimiser.zero_grad(set_to_none=True)
                # DDP averages gradients over workers; scaling by world makes that the global batch mean.
                loss = self._weighted_loss(
                    self.train_module, batch, self.global_batch[step], 5, pass_index, step
                )
                loss = loss * world
                loss = loss + self._regularisation(self.model)
                loss.backward()
                for optimiser in self.optimizers:
                    optimiser.step()
                total += loss.detach()  # stays on the device: no host sync inside the hot loop
                count += 1
        return float(total) / max(count, 1)

    @torch.no_grad()
    def learning_check(self, n_images: int = 32) -> float | None:
        """The detector's own sign of learning on a fixed handful of training images (SimpleNet: how well
        it separates true from fake patches), or None when the detector has no such check."""
        check = getattr(self.model, "separation", None)
        if check is None:
            return None
        rows = self.rows[:n_images]  # rows this worker holds (each worker checks its own handful)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return check(self.store.batch(rows, self.device), self._sample_seeds(rows, 11))

    # ------------------------------------------------------------------ epochs
    def train_epoch(self) -> EpochLog:
        start = time.perf_counter()
        image_scores, patch_scores = self.confidence_scores()
        self.last_scores = image_scores
        fence = self.update_weights(image_scores, patch_scores)
        self.weight_history.append(self.sample_weights.detach().float().cpu().clone())
        l_tr = l_val = None
        if self.comet.uses_meta:
            l_tr, l_val = self.meta_phase()
        loss = self.main_phase()
        extra: dict = {}
        separation = self.learning_check()
        if separation is not None:
            extra["separation"] = separation
            if self.epoch + 1 >= NOT_LEARNING_AFTER and separation < NOT_LEARNING_BELOW:
                extra["warning"] = (
                    f"WARNING: the discriminator is not learning (separation {separation:.2f} < "
                    f"{NOT_LEARNING_BELOW}): raise noise_std or train longer"
                )
                logger.warning(extra["warning"])
        weights = self.sample_weights
        injected = self.injected
        log = EpochLog(
            epoch=self.epoch,
            loss=loss,
            lam=self.lam,
            det_sigma=self.det_sigma,
            fence=fence,
            mean_weight=float(weights.mean()),
            low_confidence=int((weights < 1).sum()),
            weight_histogram=weight_histogram(weights),
            mean_weight_injected=float(weights[injected].mean()) if injected.any() else None,
            mean_weight_nominal=float(weights[~injected].mean()) if injected.any() else None,
            meta_l_tr=l_tr,
            meta_l_val=l_val,
            seconds=time.perf_counter() - start,
            extra=extra,
        )
        self.epoch += 1
        return log

    def fit(self, epochs: int, on_epoch_end: EpochReporter | None = None) -> list[EpochLog]:
        logs = []
        while self.epoch < epochs:
            log = self.train_epoch()
            logs.append(log)
            if on_epoch_end is not None:
                on_epoch_end(self, log)
        if self.config.bn_recalibrate and self.epoch >= self.config.epochs:  # the final model's, on one pass
            batches = (
                (self.store.batch(b, self.device), self._sample_seeds(b, 17))
                for b in self._batches(self._generator(17))
            )
            schedule.recalibrate_batchnorm(self.model, batches, self.collective)
        return logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume: model, optimisers and CoMet state (weights keyed by sample id)."""
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "sample_ids": list(self.store.ids),
            "sample_weights": self.sample_weights.clone(),
            "patch_weights": None if self.patch_weights is None else self.patch_weights.clone(),
            "weight_history": self.weight_history_tensor(),
            "history": self.history.state(),
            "lam": self.lam,
            "det_sigma": self.det_sigma,
            "torch_rng": torch.get_rng_state(),
        }

    def weight_history_tensor(self) -> torch.Tensor:
        """The weights of every epoch so far, ``[epochs, N]`` in store order (NaN: not recorded)."""
        if not self.weight_history:
            return torch.zeros(0, len(self.store))
        return torch.stack(self.weight_history)

    def load_state_dict(self, state: dict) -> None:
        same_ids = list(state["sample_ids"]) == list(self.store.ids)
        if not same_ids:
            by_id = dict(zip(state["sample_ids"], state["sample_weights"].tolist()))
            self.sample_weights = torch.tensor([by_id.get(i, 1.0) for i in self.store.ids])
        else:
            self.sample_weights = state["sample_weights"].clone()
        self.patch_weights = state["patch_weights"]
        self.epoch = int(state["epoch"])
        # State saved before weight histories existed: the earlier epochs' weights are unknown (NaN).
        history = state.get("weight_history")
        if history is None:
            history = torch.full((self.epoch, len(state["sample_ids"])), float("nan"))
        if not same_ids:
            column = {sample_id: j for j, sample_id in enumerate(state["sample_ids"])}
            rows = torch.full((history.shape[0], len(self.store)), float("nan"))
            for i, sample_id in enumerate(self.store.ids):
                if sample_id in column:
                    rows[:, i] = history[:, column[sample_id]]
            history = rows
        self.weight_history = list(history.float().unbind(0))
        self.model.load_state_dict(state["model"])
        for optimiser, optimiser_state in zip(self.optimizers, state["optimizers"]):
            optimiser.load_state_dict(optimiser_state)
        self.history.load_state(state["history"])
        self.lam = float(state["lam"])
        self.det_sigma = float(state["det_sigma"])
        torch.set_rng_state(state["torch_rng"])


# The per-epoch reporter seam: ``on_epoch_end(trainer, epoch_log)`` after every epoch. The plain run prints the
# line and saves its resume state (cli/train.py), a Ray Train worker reports to Ray with its checkpoint
# (distributed/train.py: RayTrainReporter), a Tune trial reports its objective (distributed/tune/trial.py); all
# save per-epoch state through comet_ray.resume.
EpochReporter = Callable[[CometTrainer, EpochLog], None]
