"""In-process FedAvg over department silos: which aggregation of the item rows learns?

A plain loop (no Flower, no Ray) over the synthetic department silos, so that variants of
the aggregation can be compared in seconds; the shipped rule lives in
``federation/aggregation.py`` and is measured end to end by ``fedmart simulate``.

    python bench/department_silos.py VARIANT [USERS] [ROUNDS]

VARIANT: ``central`` (one model on the pooled data, ROUNDS epochs), ``base`` (plain FedAvg),
``fedadam`` (server Adam, eta 0.01), ``restrict`` (each node's softmax over its own items),
``rownorm_emb`` (holder-normalised embedding rows), ``rownorm`` (embedding and head rows,
non-holders' head updates kept and amplified), ``restrict_rownorm``, ``holders_only``
(each item row averaged over its holders only: non-holders' updates of the row dropped;
the shipped rule). Prints validation NDCG@10 on the pooled split
after every round. BENCHMARKS.md, "Department silos", used 5000 users and 4 rounds.
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from clients.partition import partition
from clients.sequences import TrainDataset, build_sequences, leave_one_out
from clients.synthetic import generate
from clients.trainer import evaluate, evaluate_popularity, make_loader, make_optimizer, train_epoch
from conf.settings import PartitionSettings, SyntheticSettings, TrainSettings
from federation.globalmodel import build_model

VARIANTS = ("central", "base", "fedadam", "restrict", "rownorm_emb", "rownorm", "restrict_rownorm", "holders_only")
MODEL = {"hidden": 64, "layers": 2, "heads": 2, "dropout": 0.2, "attn_dropout": 0.2, "text": False}
OPTIM = TrainSettings(lr=1e-3, batch_size=128)
CPU = torch.device("cpu")


def local_train(model, ds: TrainDataset, present: torch.Tensor, restrict: bool) -> None:
    opt = make_optimizer(model, OPTIM)
    model.train()
    bias = torch.where(present, 0.0, float("-inf")) if restrict else None
    for x, y in make_loader(ds, OPTIM.batch_size, 0):
        opt.zero_grad()
        if bias is None:
            _, loss = model(x, y)
        else:
            h = model.hidden_states(x)
            y = y[:, x.shape[1] - h.shape[1] :]
            valid = y > 0
            loss = F.cross_entropy(model.head(h[valid]) + bias, y[valid])
        loss.backward()
        opt.step()


def main() -> None:
    variant = sys.argv[1]
    if variant not in VARIANTS:
        raise SystemExit(f"VARIANT must be one of {', '.join(VARIANTS)}")
    users = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    torch.set_num_threads(1)
    cat, inter = generate(SyntheticSettings(num_users=users, num_items=1000, num_departments=10, num_merchants=25))
    central = leave_one_out(build_sequences(inter))
    n_rows = len(cat.item_id) + 1
    nodes = []
    for rows in partition(inter, cat, PartitionSettings(scheme="department")).rows:
        split = leave_one_out(build_sequences(inter.take(rows)))
        present = np.zeros(n_rows, bool)
        present[split.train.items] = True
        nodes.append((TrainDataset(split.train, 50), torch.from_numpy(present)))
    g = build_model(cat, {**MODEL, "label_smoothing": 0.0}, 50)
    t0 = time.time()

    def report(r: int) -> None:
        ndcg = evaluate(g, central, "valid", CPU)["ndcg@10"]
        print(variant, r + 1, round(ndcg, 4), f"{time.time() - t0:.0f}s", flush=True)

    if variant == "central":
        ds, opt = TrainDataset(central.train, 50), make_optimizer(g, OPTIM)
        for r in range(rounds):
            train_epoch(g, make_loader(ds, OPTIM.batch_size, r), opt, CPU)
            report(r)
        return
    print("popularity", round(evaluate_popularity(central, n_rows - 1, "valid")["ndcg@10"], 4))
    row_keys = {"rownorm": ("item_emb.weight", "head.weight", "head.bias"), "rownorm_emb": ("item_emb.weight",)}
    row_keys["restrict_rownorm"] = row_keys["holders_only"] = row_keys["rownorm"]
    adam: dict[str, dict] = {"m": {}, "v": {}}
    for r in range(rounds):
        gs = {k: v.clone() for k, v in g.state_dict().items()}
        acc = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in gs.items()}
        held = torch.zeros(n_rows)
        wsum = 0.0
        for ds, present in nodes:
            m = copy.deepcopy(g)
            local_train(m, ds, present, restrict=variant.startswith("restrict"))
            w = float(len(ds))
            wsum += w
            held += w * present.float()
            for k, v in m.state_dict().items():
                delta = v.float() - gs[k].float()
                if variant == "holders_only" and k in row_keys["rownorm"]:
                    delta[~present] = 0.0  # a node speaks only for the items it holds
                acc[k] += w * delta
        new = {}
        for k in gs:
            if k in row_keys.get(variant, ()):
                delta = acc[k] / held.clamp(min=1e-9).view(-1, *([1] * (acc[k].dim() - 1)))
            else:
                delta = acc[k] / wsum
            new[k] = (gs[k].float() + delta).to(gs[k].dtype)
        if variant == "fedadam":  # flwr's FedAdam update, eta 0.01, tau 1e-3
            b1, b2, tau, eta = 0.9, 0.99, 1e-3, 0.01
            eta_norm = eta * np.sqrt(1 - b2 ** (r + 2)) / (1 - b1 ** (r + 2))
            for k in gs:
                if gs[k].is_floating_point():
                    d = acc[k] / wsum
                    adam["m"][k] = b1 * adam["m"].get(k, torch.zeros_like(d)) + (1 - b1) * d
                    adam["v"][k] = b2 * adam["v"].get(k, torch.zeros_like(d)) + (1 - b2) * d * d
                    new[k] = gs[k] + eta_norm * adam["m"][k] / (adam["v"][k].sqrt() + tau)
        g.load_state_dict(new)
        report(r)


if __name__ == "__main__":
    main()
