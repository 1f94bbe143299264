"""Silo schemes for simulation: which node holds which interaction rows.

Every scheme returns a list of row-index arrays, one per node, that are disjoint
and together cover every row: no event is lost or duplicated (tests check it).

* ``merchant``: MovieLens's natural merchants are the 21 occupations, and a user
  belongs to exactly one (``user_attrs["occupation"]``). Data without that
  attribute (synthetic) uses the catalog's merchant of each item instead, so a
  user's history is split across the merchants they bought from.
* ``department``: the item's department (MovieLens: primary genre). A user's
  history is split across departments, as it is on a real platform.
* ``dirichlet``: users (whole histories) are split non-IID with flwr-datasets'
  ``DirichletPartitioner`` over the user's majority department, concentration ``alpha``.
* ``iid``: users split uniformly at random with flwr-datasets' ``IidPartitioner``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.interactions import Interactions
from conf.settings import PARTITION_SCHEMES, PartitionSettings
from federation.catalog import Catalog

__all__ = ["Partition", "partition", "SCHEMES"]

SCHEMES = PARTITION_SCHEMES


@dataclass
class Partition:
    names: list[str]  # node names (department, merchant, or "node-<i>")
    rows: list[np.ndarray]  # row indices of each node

    def __len__(self) -> int:
        return len(self.names)


def _group_rows(keys: np.ndarray) -> Partition:
    names, inverse = np.unique(keys.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(names) + 1))
    return Partition(names=[str(n) for n in names], rows=[order[bounds[i] : bounds[i + 1]] for i in range(len(names))])


def _users_to_rows(data: Interactions, user_part: np.ndarray, n: int) -> Partition:
    row_part = user_part[data.user]
    order = np.argsort(row_part, kind="stable")
    bounds = np.searchsorted(row_part[order], np.arange(n + 1))
    return Partition(
        names=[f"node-{i:03d}" for i in range(n)], rows=[order[bounds[i] : bounds[i + 1]] for i in range(n)]
    )


def _majority_department(data: Interactions, catalog: Catalog) -> np.ndarray:
    dept_names, dept_code = np.unique(catalog.department, return_inverse=True)
    item_dept = np.concatenate([[0], dept_code])  # index 0 = padding
    counts = np.zeros((data.num_users, len(dept_names)), dtype=np.int64)
    np.add.at(counts, (data.user, item_dept[data.item]), 1)
    return counts.argmax(axis=1)


def partition(data: Interactions, catalog: Catalog, cfg: PartitionSettings) -> Partition:
    """Assign every row of ``data`` to exactly one node."""
    if cfg.scheme == "merchant":
        if "occupation" in data.user_attrs:
            return _group_rows(data.user_attrs["occupation"][data.user])
        return _group_rows(catalog.merchant[data.item - 1])
    if cfg.scheme == "department":
        return _group_rows(catalog.department[data.item - 1])

    from datasets import Dataset

    n = int(cfg.num_partitions)
    # Shuffle users first: IidPartitioner shards contiguously, and user order is not random.
    perm = np.random.default_rng(cfg.seed).permutation(data.num_users)
    users = Dataset.from_dict({"user": perm, "label": _majority_department(data, catalog)[perm].astype(np.int64)})
    if cfg.scheme == "iid":
        from flwr_datasets.partitioner import IidPartitioner

        part = IidPartitioner(num_partitions=n)
    else:
        from flwr_datasets.partitioner import DirichletPartitioner

        part = DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=0,
            self_balancing=True,
            shuffle=True,
            seed=cfg.seed,
        )
    part.dataset = users
    user_part = np.full(data.num_users, -1, dtype=np.int64)
    for i in range(n):
        user_part[np.asarray(part.load_partition(i)["user"], dtype=np.int64)] = i
    if (user_part < 0).any():  # flwr-datasets guarantees a cover; fail loudly if that changes
        raise RuntimeError(f"{int((user_part < 0).sum())} users were not assigned to any partition")
    return _users_to_rows(data, user_part, n)
