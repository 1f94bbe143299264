"""Title words for the synthetic world that carry its successor graph: a product line and a brand.

Only the department says anything in the generator's first titles ("Vintage Router 00910"),
so text could not help beyond it. Here every item also gets a *line* (category) word shared
by items that follow each other in the successor graph, and a finer *brand* word inside its
line, so a text tower can place an item it has never seen near its likely predecessors and
successors. A share ``NOISE`` of items get a random line word, and separately a random brand
word, as real catalogs mislabel.

The successor graph has no planted clusters (successors are drawn by popularity), so the
groups are found in it: label propagation on the symmetrised graph, edges weighted by how
often the transition is taken (the source item's popularity times the successor's weight),
with a size penalty that keeps groups near a target size (modularity with a resolution
scaled to it). Lines are found per department, brands per line. Vectorised: a few sparse
products per round, so 10^5 items take seconds. The words are department-local (a department
of more than 32 lines numbers the rest: "Aurora-2").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

__all__ = ["NOISE", "LINE_SIZE", "BRAND_SIZE", "graph_words"]

NOISE = 0.15  # share of items whose line (and, independently, brand) word is random
LINE_SIZE = 12  # target items per line (category)
BRAND_SIZE = 4  # target items per brand, inside a line
_ROUNDS = 12  # enough: the share of transitions inside a line barely moves after ~10
_RESOLUTION = 0.25  # times group size / target size: larger penalises big groups more

_LINES = [
    "Aurora", "Summit", "Harbor", "Meadow", "Cobalt", "Ember", "Glacier", "Canyon", "Willow",
    "Falcon", "Orchid", "Granite", "Lagoon", "Prairie", "Comet", "Juniper", "Sierra", "Tundra",
    "Coral", "Maple", "Nimbus", "Saffron", "Boreal", "Delta", "Equinox", "Fjord", "Horizon",
    "Island", "Jasper", "Kodiak", "Lotus", "Mistral",
]  # fmt: skip
_BRAND_HEADS = [
    "Nor", "Kes", "Vel", "Tor", "Lum", "Zan", "Bri", "Cal", "Dra", "Fen", "Gal", "Hal", "Mar", "Ost", "Pel", "Rav",
]  # fmt: skip
_BRAND_TAILS = [
    "vik", "tra", "ora", "mex", "dal", "ion", "ex", "ano", "ix", "ford", "wick", "sen", "ita", "ux", "eon", "ard",
]  # fmt: skip


def graph_words(
    dept: np.ndarray,
    succ: np.ndarray,
    succ_w: np.ndarray,
    popularity: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Line and brand word of every item, as two ``(n,)`` string arrays.

    ``dept`` (n,) sorted department per item; ``succ`` (n, k) successor item indices (0-based);
    ``succ_w`` (k,) weight of the k-th successor; ``popularity`` (n,) relative traffic of each
    item within its department. All randomness comes from ``rng``.
    """
    n = len(dept)
    share = popularity / np.bincount(dept, weights=popularity)[dept]
    src = np.repeat(np.arange(n), succ.shape[1])
    w = (share[:, None] * (succ_w / succ_w.sum())[None, :]).ravel()
    keep = src != succ.ravel()
    adj = sp.csr_matrix((w[keep], (src[keep], succ.ravel()[keep])), shape=(n, n))
    adj = (adj + adj.T).tocsr()  # (n, n): a transition either way ties two items

    line = _communities(adj, dept, LINE_SIZE, rng)
    brand = _communities(adj, line, BRAND_SIZE, rng)
    line, brand = _add_noise(line, dept, rng), _add_noise(brand, dept, rng)
    return _names(line, dept, _line_name), _names(brand, dept, _brand_name)


def _communities(adj: sp.csr_matrix, group: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Labels (n,) that never cross ``group``: each item moves to the neighbouring label it is
    most tied to, less a penalty for the label's size; half the items move per round, so the
    synchronous update does not oscillate."""
    n = adj.shape[0]
    deg = np.asarray(adj.sum(axis=1)).ravel()
    _, g, g_size = np.unique(group, return_inverse=True, return_counts=True)
    g_deg = np.bincount(g, weights=deg)
    per_group = np.maximum(1, np.ceil(g_size / size)).astype(np.int64)
    first_label = np.concatenate([[0], np.cumsum(per_group)[:-1]])
    label = first_label[g] + (rng.random(n) * per_group[g]).astype(np.int64)
    label_group = np.repeat(np.arange(len(per_group)), per_group)
    penalty = _RESOLUTION * (g_size[g] / size) * deg / np.maximum(g_deg[g], 1e-300)  # (n,)
    for _ in range(_ROUNDS):
        vol = np.bincount(label, weights=deg, minlength=int(per_group.sum()))
        onehot = sp.csr_matrix((np.ones(n), (np.arange(n), label)), shape=(n, len(vol)))
        tie = (adj @ onehot).tocsr()  # (n, labels): weight from each item to each label
        r, c = np.repeat(np.arange(n), np.diff(tie.indptr)), tie.indices
        own = c == label[r]
        gain = tie.data - penalty[r] * (vol[c] - np.where(own, deg[r], 0.0))
        gain[label_group[c] != g[r]] = -np.inf  # a neighbour across the group boundary
        stay = -penalty * (vol[label] - deg)  # the own label's gain when no neighbour holds it
        stay[r[own]] = gain[own]
        best, best_gain = label.copy(), np.full(n, -np.inf)
        held = np.flatnonzero(np.diff(tie.indptr))  # rows with at least one neighbouring label
        if len(held):
            best_gain[held] = np.maximum.reduceat(gain, tie.indptr[held])
            at = np.flatnonzero(gain == best_gain[r])
            at = at[np.r_[True, r[at][1:] != r[at][:-1]]]  # the first best entry of each row
            best[r[at]] = c[at]
        move = (best_gain > stay) & (rng.random(n) < 0.5)  # never to -inf: stay is finite
        label = np.where(move, best, label)
    return label


def _add_noise(label: np.ndarray, dept: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give a ``NOISE`` share of items the label of a random item of their department."""
    noisy = rng.random(len(label)) < NOISE
    start = np.searchsorted(dept, dept)  # dept is sorted: the first row of each item's department
    count = np.bincount(dept)[dept]
    donor = start + (rng.random(len(label)) * count).astype(np.int64)
    return np.where(noisy, label[donor], label)


def _names(label: np.ndarray, dept: np.ndarray, name: Callable[[int], str]) -> np.ndarray:
    """Department-local numbering (0, 1, ... in order of first appearance) mapped to words: the
    same word may name a line in two departments, whose items never follow each other."""
    out = np.empty(len(label), dtype=object)
    for d in np.unique(dept):
        rows = np.flatnonzero(dept == d)
        _, first, local = np.unique(label[rows], return_index=True, return_inverse=True)
        rank = np.argsort(np.argsort(first))  # number labels by where they first appear
        out[rows] = [name(int(k)) for k in rank[local]]
    return out.astype(str)


def _line_name(k: int) -> str:
    word = _LINES[k % len(_LINES)]
    return word if k < len(_LINES) else f"{word}-{k // len(_LINES) + 1}"


def _brand_name(k: int) -> str:
    # Head and tail both change from one brand to the next ("Norvik", "Kestra", ...), so that
    # neighbouring brands do not share a sub-word; (k mod 16, (k + k div 16) mod 16) is one-to-one.
    h, t = len(_BRAND_HEADS), len(_BRAND_TAILS)
    word = _BRAND_HEADS[k % h] + _BRAND_TAILS[(k + k // h) % t]
    return word if k < h * t else f"{word}-{k // (h * t) + 1}"
