"""Seeded synthetic e-commerce interactions with real sequential signal.

The world: ``num_departments`` departments, ``num_merchants`` merchants (each at home
in one department), items with Zipf popularity inside their department, and a
sparse successor graph (item -> ``num_successors`` related items in the same
department: the accessory after the camera). Users have sparse department tastes
(Dirichlet) and shop in sessions: a session picks a department from the user's
taste, starts at a popular item, and then either follows the successor graph
(probability ``p_follow``) or jumps to another popular item of the department.

So a sequence model can learn transitions that popularity cannot see, while the
jumps and session starts keep the task far from trivial. Generation is vectorised
over all sessions at once (a loop over position-in-session, not over events), so
10^7 interactions take seconds.

Titles name the department's noun and, drawn from a random stream of their own
(``clients/synthetic_titles.py``), a product line and a brand found in the successor
graph, so text tells related items apart within a department.
"""

from __future__ import annotations

import numpy as np

from clients.interactions import Interactions
from clients.synthetic_titles import graph_words
from conf.settings import SyntheticSettings
from federation.catalog import Catalog

__all__ = ["generate"]

_DEPARTMENTS = [
    (
        "Electronics",
        ["Headphones", "Speaker", "Charger", "Camera", "Tablet", "Monitor", "Keyboard", "Router"],
    ),
    (
        "Books",
        ["Novel", "Cookbook", "Atlas", "Biography", "Guide", "Anthology", "Workbook", "Journal"],
    ),
    ("Home", ["Lamp", "Blanket", "Vase", "Curtain", "Rug", "Cushion", "Mirror", "Clock"]),
    (
        "Garden",
        ["Hose", "Shovel", "Planter", "Seeds", "Trimmer", "Gloves", "Sprinkler", "Fertilizer"],
    ),
    ("Toys", ["Puzzle", "Robot", "Doll", "Blocks", "Kite", "Train", "Drone", "Boardgame"]),
    ("Sports", ["Racket", "Ball", "Helmet", "Bottle", "Mat", "Dumbbell", "Tent", "Backpack"]),
    ("Beauty", ["Serum", "Lipstick", "Shampoo", "Perfume", "Cream", "Brush", "Mask", "Polish"]),
    ("Grocery", ["Coffee", "Tea", "Pasta", "Olive-Oil", "Chocolate", "Honey", "Rice", "Granola"]),
    ("Fashion", ["Jacket", "Sneakers", "Scarf", "Watch", "Belt", "Dress", "Hat", "Sunglasses"]),
    (
        "Automotive",
        ["Wiper", "Tyre", "Battery", "Dashcam", "Cover", "Polish-Kit", "Jack", "Mat-Set"],
    ),
    ("Kitchen", ["Kettle", "Pan", "Knife", "Blender", "Toaster", "Grater", "Mug", "Scale"]),
    ("Pets", ["Leash", "Bowl", "Bed", "Treats", "Collar", "Brush", "Toy", "Carrier"]),
]
_ADJECTIVES = [
    "Compact", "Wireless", "Classic", "Premium", "Eco", "Smart", "Vintage", "Portable", "Deluxe",
    "Mini", "Ultra", "Organic", "Rugged", "Silent", "Bright", "Soft",
]  # fmt: skip
_TITLE_STREAM = 0x7469746C  # spawn key of the title words' stream ("titl"), clear of .spawn() children


def _dept_name(d: int) -> tuple[str, list[str]]:
    name, nouns = _DEPARTMENTS[d % len(_DEPARTMENTS)]
    return (name if d < len(_DEPARTMENTS) else f"{name}-{d // len(_DEPARTMENTS)}"), nouns


def _catalog(cfg: SyntheticSettings, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Catalog columns but the title, and each item's department index, adjective and noun."""
    n, D, M = cfg.num_items, cfg.num_departments, cfg.num_merchants
    dept = np.sort(rng.integers(0, D, size=n))
    dept[:D] = np.arange(D)  # every department has at least one item
    dept = np.sort(dept)
    # Merchants are at home in department m % D; an item is sold by one of its
    # department's merchants (or any merchant if the department has none).
    merchant = np.empty(n, dtype=np.int64)
    for d in range(D):
        home = np.arange(d, M, D)
        rows = np.flatnonzero(dept == d)
        merchant[rows] = rng.choice(home, size=len(rows)) if len(home) else rng.integers(0, M, len(rows))
    adj = rng.integers(0, len(_ADJECTIVES), n)
    noun = rng.integers(0, 8, n)
    price = np.round(np.exp(rng.normal(3.0, 0.8, n)), 2)
    return {"dept": dept, "merchant": merchant, "adj": adj, "noun": noun, "price": price}


def _titles(parts: dict[str, np.ndarray], line: np.ndarray, brand: np.ndarray) -> np.ndarray:
    """Titles "<Adjective> <Noun> by <Brand>, <Line> line <index>": the noun says the department,
    brand and line the item's place in the successor graph (``clients/synthetic_titles.py``)."""
    titles = []
    for i, (d, a, k) in enumerate(zip(parts["dept"], parts["adj"], parts["noun"], strict=True)):
        nouns = _dept_name(int(d))[1]
        titles.append(f"{_ADJECTIVES[a]} {nouns[k]} by {brand[i]}, {line[i]} line {i:05d}")
    return np.array(titles)


def generate(cfg: SyntheticSettings | None = None) -> tuple[Catalog, Interactions]:
    """Generate a catalog and interactions, deterministically from ``cfg.seed``."""
    cfg = cfg or SyntheticSettings()
    if cfg.num_departments > len(_DEPARTMENTS) * 100:
        raise ValueError(f"data.synthetic.num_departments must be at most {len(_DEPARTMENTS) * 100}")
    rng = np.random.default_rng(cfg.seed)
    parts = _catalog(cfg, rng)
    dept = parts["dept"]
    n, D, U = cfg.num_items, cfg.num_departments, cfg.num_users

    # Popularity: Zipf over a random order of the items within each department.
    dept_start = np.searchsorted(dept, np.arange(D + 1))
    weight = np.empty(n)
    for d in range(D):
        k = dept_start[d + 1] - dept_start[d]
        ranks = rng.permutation(k) + 1
        weight[dept_start[d] : dept_start[d + 1]] = 1.0 / ranks**cfg.zipf_a
    # Stacked CDF: department d occupies (d, d + 1], so one searchsorted serves all.
    cdf = np.empty(n)
    for d in range(D):
        w = weight[dept_start[d] : dept_start[d + 1]]
        cdf[dept_start[d] : dept_start[d + 1]] = d + np.cumsum(w) / w.sum()
    cdf[dept_start[1:] - 1] = np.arange(1, D + 1)  # exact upper edges

    def popular_in(d: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(cdf, d + rng.random(len(d)), side="right")
        return np.minimum(idx, dept_start[d + 1] - 1)

    # Successor graph: related items in the same department, drawn by popularity.
    succ = popular_in(np.repeat(dept, cfg.num_successors)).reshape(n, cfg.num_successors)
    succ_w = cfg.successor_decay ** np.arange(cfg.num_successors)
    succ_cdf = np.cumsum(succ_w) / succ_w.sum()
    # Title words from their own stream, so that adding them moved no draw of ``rng``.
    line, brand = graph_words(dept, succ, succ_w, weight, np.random.default_rng(_title_seed(cfg.seed)))
    catalog = Catalog(
        item_id=np.array([f"SKU-{i:07d}" for i in range(n)]),
        title=_titles(parts, line, brand),
        department=np.array([_dept_name(int(d))[0] for d in dept]),
        merchant=np.array([f"merchant-{m:04d}" for m in parts["merchant"]]),
        price=parts["price"],
    )

    # Users: sparse department tastes, history lengths around events_per_user.
    taste = rng.dirichlet(np.full(D, cfg.dept_concentration), size=U)
    taste_cdf = np.cumsum(taste, axis=1)
    lengths = np.maximum(3, rng.poisson(cfg.events_per_user - 3, U) + 3)
    T = int(lengths.sum())
    user = np.repeat(np.arange(U, dtype=np.int64), lengths)
    first = np.zeros(T, dtype=bool)
    first[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True

    # Sessions: a new one starts at a user's first event or with prob 1/mean length.
    new_session = first | (rng.random(T) < 1.0 / cfg.mean_session_length)
    session_id = np.cumsum(new_session) - 1
    starts = np.flatnonzero(new_session)
    pos = np.arange(T) - starts[session_id]
    # Department per session, sampled from the user's taste (inverse CDF per row).
    r = rng.random(len(starts))
    sess_dept = (taste_cdf[user[starts]] < r[:, None]).sum(axis=1).clip(max=D - 1)
    ev_dept = sess_dept[session_id]

    item = np.zeros(T, dtype=np.int64)
    at = np.flatnonzero(pos == 0)
    item[at] = popular_in(ev_dept[at])
    step = 1
    while True:
        at = np.flatnonzero(pos == step)
        if len(at) == 0:
            break
        prev = item[at - 1]
        follow = rng.random(len(at)) < cfg.p_follow
        j = np.searchsorted(succ_cdf, rng.random(len(at)), side="right").clip(max=cfg.num_successors - 1)
        item[at] = np.where(follow, succ[prev, j], popular_in(ev_dept[at]))
        step += 1

    # Time: users start within a year; minutes between events of a session, days between sessions.
    start_time = 1_700_000_000 + rng.integers(0, 365 * 86_400, U)
    gap = np.where(new_session, rng.exponential(3 * 86_400, T), rng.exponential(180, T)).astype(np.int64) + 1
    gap[first] = 0
    ts = start_time[user] + _segmented_cumsum(gap, first)

    event = np.array(["view", "cart", "purchase"])[np.searchsorted([0.8, 0.95], rng.random(T), side="right")]
    interactions = Interactions(
        user=user,
        item=item + 1,  # model indices are 1-based
        timestamp=ts,
        user_ids=np.char.add("u", np.char.zfill(np.arange(U).astype(str), 7)),
        event=event,
    )
    return catalog, interactions


def _title_seed(seed: int) -> np.random.SeedSequence:
    """The title words' stream: a child of ``seed`` keyed on a constant, apart from the world's."""
    return np.random.SeedSequence(seed, spawn_key=(_TITLE_STREAM,))


def _segmented_cumsum(x: np.ndarray, segment_start: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``x`` restarting at every True in ``segment_start``."""
    c = np.cumsum(x)
    seg = np.cumsum(segment_start) - 1
    base = (c - x)[segment_start]
    return c - base[seg]
