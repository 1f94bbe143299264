from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from federation.runconfig import flatten, unflatten

keys = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
leaves = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=8).filter(
    lambda s: s != "" and not s.startswith("json:")), st.lists(st.integers(), max_size=3))  # fmt: skip
trees = st.recursive(leaves, lambda c: st.dictionaries(keys, c, min_size=1, max_size=3), max_leaves=10)


@given(st.dictionaries(keys, trees, min_size=1, max_size=4))
def test_flatten_roundtrip(cfg):
    flat = flatten(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert unflatten(flat) == cfg
