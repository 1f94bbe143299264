"""Local training and evaluation of the recommender on one node's sequences.

The same loop serves a federated node (a few local epochs on the received
global model) and the centralized baseline (one node that holds everything).
Privacy is added by wrapping (``privacy.dp.make_private``), never inside the loop.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

from clients.sequences import Split, TrainDataset, eval_batches
from conf.settings import TrainSettings
from federation.metrics import RankingMetrics, popularity_scores, ranks
from federation.model import SASRec
from privacy.dp import PrivateTraining

__all__ = [
    "make_optimizer",
    "make_loader",
    "train_epoch",
    "train_epoch_private",
    "evaluate",
    "evaluate_popularity",
    "seed_everything",
]

log = logging.getLogger(__name__)


def make_optimizer(model: torch.nn.Module, cfg: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )


def make_loader(dataset: TrainDataset, batch_size: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, drop_last=False)


def train_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    per_example_loss: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, steps and examples seen.

    ``per_example_loss`` asks the model for a (b,) loss and averages it here; Opacus's
    ghost clipping wraps such a loss itself.
    """
    model.train()
    total, steps, examples = 0.0, 0, 0
    for inputs, targets in loader:
        if len(inputs) == 0:  # Poisson sampling may draw an empty batch
            continue
        inputs, targets = (
            inputs.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
        )
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(inputs, targets, reduction="none" if per_example_loss else "mean")
        if per_example_loss:
            loss = loss.mean()
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError("training loss is not finite; lower the learning rate")
        total += loss.item()
        steps += 1
        examples += len(inputs)
    return {"loss": total / max(steps, 1), "steps": steps, "examples": examples}


def train_epoch_private(pt: PrivateTraining, device: torch.device, *, max_steps: int | None = None) -> dict[str, float]:
    """One pass over ``pt.data_loader`` with the objects of ``privacy.dp.make_private``.

    The same loop in every mode: private modes ask the model for the per-example
    (per-user) loss, shape (b,), and ``pt.loss_fn`` turns it into what ``.backward()``
    needs (a mean, or Opacus's two-pass ghost-clipping loss); off mode uses the compact
    ``reduction="mean"`` head, the fastest non-private path. An empty Poisson batch is
    a noise-only step (``pt.noise_step()``), never skipped: skipping would reveal it.

    Returns mean loss over non-empty batches, optimizer steps (noise-only ones
    included), examples seen, and ``epsilon`` (the dataset's total so far, 0 when off).
    The loss is computed on private data outside the DP mechanism: keep it local.
    ``max_steps`` stops the pass early (bounded local work; the accountant counts the
    steps actually taken).
    """
    model = pt.module
    model.train()
    reduction = "none" if pt.is_private else "mean"
    # bk clips in one pass and can score only the positions with a target, like "mean"
    packed = pt.grad_sample_mode == "bk" and getattr(model, "has_packed_loss", False)
    total, batches, steps, examples = 0.0, 0, 0, 0
    with warnings.catch_warnings():
        # Opacus's backward hooks on the item embedding (integer inputs) make torch warn every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for inputs, targets in pt.data_loader:
            if max_steps is not None and steps >= max_steps:
                break
            if len(inputs) == 0:
                pt.noise_step()
                steps += int(pt.is_private)
                continue
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            pt.optimizer.zero_grad(set_to_none=True)
            if packed:
                per_example = model.packed_loss(inputs, targets)  # (b,)
            else:
                _, per_example = model(inputs, targets, reduction=reduction)  # (b,), or a scalar when off
            loss = pt.loss_fn(per_example)
            loss.backward()
            pt.optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError("training loss is not finite; lower the learning rate")
            total += value
            batches += 1
            steps += 1
            examples += len(inputs)
    return {
        "loss": total / max(batches, 1),
        "steps": steps,
        "examples": examples,
        "epsilon": pt.epsilon(),
    }


@torch.no_grad()
def evaluate(
    model: SASRec,
    split: Split,
    which: str,
    device: torch.device,
    *,
    batch_size: int = 256,
    ks=(10,),
) -> dict[str, float]:
    """Full-ranking HR@K, NDCG@K, MRR on ``which`` in {valid, test}, seen items masked."""
    model.eval()
    m = RankingMetrics(ks)
    for batch in eval_batches(split, which, model.config.max_len, batch_size):
        scores = model.score_last(batch.inputs.to(device)).cpu()
        m.update(ranks(scores, batch.targets, batch.seen))
    return m.compute()


def evaluate_popularity(split: Split, num_items: int, which: str, *, ks=(10,)) -> dict[str, float]:
    """The popularity baseline (training counts), evaluated exactly like the model."""
    counts = split.item_counts(num_items)
    m = RankingMetrics(ks)
    for batch in eval_batches(split, which, max_len=1, batch_size=512):
        # max_len=1 keeps tensors small; `seen` still carries each user's full history.
        m.update(ranks(popularity_scores(counts, len(batch.targets)), batch.targets, batch.seen))
    return m.compute()


def seed_everything(seed: int) -> None:
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
