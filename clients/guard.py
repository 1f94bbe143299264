"""Two node-side client mods around the train handler: an update guard and test-only faults.

``ClientApp(mods=[secagg_mod, update_guard_mod, fault_mod])``: a train reply travels
handler -> ``fault_mod`` -> ``update_guard_mod`` -> ``secagg_mod`` (which masks it).

* :func:`update_guard_mod` refuses to send an update with non-finite values, wrong names,
  shapes or dtypes, or values out of range (the checks of
  :func:`federation.contract.validate_update`). Under secure aggregation the coordinator
  sees only a masked vector and cannot check the values any more, so this check has to run
  on the node, *before* masking. The reply becomes an error with code
  :data:`federation.wire.ERR_BAD_UPDATE`, which the coordinator counts as *rejected*; under
  secure aggregation the node is then a dropout after the key stage, and the round goes on
  without it (its pairwise masks are rebuilt from the other nodes' shares).
* :func:`fault_mod` is a **test-only** fault injector, off unless the node's own config
  sets ``fault`` (``fedmart node`` has a hidden ``--fault`` switch; the coordinator cannot
  set it). It makes the node misbehave so the integration tests can prove the federation
  copes: ``nan-update`` / ``inf-update`` (corrupt one value of the reply),
  ``bad-shape`` (drop a row of one array), ``slow:SECONDS`` (sleep before training: a
  straggler). Never set it on a real node.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from federation import wire
from federation.contract import validate_update

__all__ = ["update_guard_mod", "fault_mod", "FAULTS", "parse_fault"]

log = logging.getLogger(__name__)

FAULTS = ("nan-update", "inf-update", "bad-shape", "slow")


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] == "train" and wire.ARRAYS in msg.content.array_records


def update_guard_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: replace a malformed train reply by an ``ERR_BAD_UPDATE`` error reply."""
    if not _is_train(msg):
        return call_next(msg, ctxt)
    reference = msg.content[wire.ARRAYS]
    out = call_next(msg, ctxt)
    if out.has_error() or wire.ARRAYS not in out.content.array_records:
        return out
    why = validate_update(out.content[wire.ARRAYS], reference)
    if not why:
        return out
    log.error("refusing to send a malformed update: %s", why)
    return Message(Error(code=wire.ERR_BAD_UPDATE, reason=f"malformed update refused by the node: {why}"), reply_to=msg)


def parse_fault(value: str) -> tuple[str, float]:
    """``"slow:30"`` -> ``("slow", 30.0)``; ``"nan-update"`` -> ``("nan-update", 0.0)``."""
    name, _, arg = str(value).partition(":")
    if name not in FAULTS:
        raise ValueError(f"unknown fault {value!r}; known: {', '.join(FAULTS)}")
    if name == "slow":
        try:
            seconds = float(arg)
        except ValueError:
            raise ValueError(f"fault {value!r}: write slow:SECONDS") from None
        if not (0 <= seconds < float("inf")):
            raise ValueError(f"fault {value!r}: the delay must be a finite number of seconds >= 0")
        return name, seconds
    return name, 0.0


def _corrupt(arrays: ArrayRecord, fault: str) -> ArrayRecord:
    out: dict[str, Array] = {}
    done = False
    for key, arr in arrays.items():
        a = np.array(arr.numpy(), copy=True)
        if not done and a.size and np.issubdtype(a.dtype, np.floating):
            if fault == "bad-shape" and a.ndim >= 1 and a.shape[0] > 1:
                a, done = a[:-1], True
            elif fault in ("nan-update", "inf-update"):
                a.flat[0] = np.nan if fault == "nan-update" else np.inf
                done = True
        out[key] = Array(np.ascontiguousarray(a))
    return ArrayRecord(out)


def fault_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod (tests only): misbehave as ``node_config["fault"]`` says; a no-op without it."""
    spec = str(ctxt.node_config.get("fault", "") or "")
    if not spec or not _is_train(msg):
        return call_next(msg, ctxt)
    fault, seconds = parse_fault(spec)
    if fault == "slow":
        log.warning("test fault: sleeping %.0fs before training (straggler)", seconds)
        time.sleep(seconds)
        return call_next(msg, ctxt)
    out = call_next(msg, ctxt)
    if out.has_error() or wire.ARRAYS not in out.content.array_records:
        return out
    log.warning("test fault: corrupting this node's update (%s)", fault)
    content = RecordDict(dict(out.content.items()))
    content[wire.ARRAYS] = _corrupt(out.content[wire.ARRAYS], fault)
    return Message(content, reply_to=msg)
