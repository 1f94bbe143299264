"""Secure aggregation on Flower's Message API: the coordinator only ever sees the sum.

Node side: ``ClientApp(mods=[secagg_mod, ...])``. Coordinator side:
``SecAggStrategy(FedAvg(...), config=SecAggConfig(...))``. See ``docs/secagg.md``.

This package depends on numpy, cryptography, flwr and :mod:`privacy.strategy_wrapper` only (never on
``federation`` or ``clients``).

The protocol
------------
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with the sparse neighbour graph of Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead" (CCS 2020). Two modes (``SecAggConfig.adversary``): ``active``
(the default) withstands a coordinator that lies, with Bonawitz et al.'s authenticated keys and
consistency check against a roster of the members' keys (``roster``, ``statements``,
``active_checks``, ``identity``, ``seen_sessions``); ``semi-honest`` an honest-but-curious one.

Every node has a long-lived X25519 *channel* key pair (advertised once, used only to encrypt
shares) and, per session (one federated round), a fresh *mask* key pair ``(s_sk, s_pk)`` and a
fresh 256-bit self-mask seed ``b``. Nodes are identified by small integer indices ``1..n``
(also their Shamir x-coordinates). With ``N(u)`` the neighbours of ``u`` in the graph:

1. **advertise keys** (only for nodes whose channel key the coordinator does not hold yet):
   the node replies with its channel public key ``c_pk``.
2. **share keys**: the coordinator sends ``u`` the channel keys of ``N(u)``. ``u`` draws
   ``s_sk`` and ``b``, Shamir-shares both among ``{u} + N(u)`` with threshold ``t``, encrypts the
   share pair for each ``v`` with AES-GCM under ``HKDF(X25519(c_sk_u, c_pk_v), session)`` and
   replies ``s_pk``, a commitment ``SHA-256(session || b)`` and the ciphertexts. Responders form
   ``U2`` (nodes whose neighbourhood within U2 falls below ``t - 1`` are pruned).
3. **masked input**: the coordinator forwards to ``u`` the ciphertexts addressed to it and the
   mask keys ``s_pk_v`` of ``v`` in ``N(u) & U2``. ``u`` sends::

       y_u = x_u + PRG(b_u) + sum_{v in N(u) & U2} sign(u, v) PRG(s_uv)    (mod M)

   with ``s_uv = HKDF(X25519(s_sk_u, s_pk_v), session)`` and ``sign = +1 if u < v else -1``, so
   the pairwise masks cancel in the sum. Responders form ``U3``.
4. **unmask**: the coordinator tells ``u in U3`` which neighbours survived (``N(u) & U3``) and
   which dropped (``N(u) & (U2 - U3)``); it need not ask every ``u``, only enough nodes to hold
   ``t`` shares of each secret (:func:`privacy.secagg.unmask_cover.unmask_cover`), and asks the rest only if
   some of those do not answer. ``u`` returns its shares of ``b_v`` for survivors (and
   itself) and of ``s_sk_v`` for the dropped, never both for the same ``v``. The coordinator
   rebuilds ``b_u`` for every ``u in U3`` and ``s_sk_v`` for every dropped ``v``, and computes::

       sum_{u in U3} x_u = sum y_u - sum PRG(b_u) - sum_{u in U3, v dropped} sign(u, v) PRG(s_uv)

Dropout semantics: a node that leaves before its masked input is excluded from the sum; one
that leaves after it is still included (its self mask is rebuilt from its neighbours' shares).
Fewer than ``t`` survivors at any stage, or fewer than ``t`` shares of a secret that must be
rebuilt, aborts the session with :class:`SecAggAbort` and a reason.

:func:`privacy.secagg.local_round.run_round_locally` drives a whole session in memory (tests and
benchmarks).

Modules: ``crypto``, ``shamir`` and ``encoding`` (primitives); ``key_agreement``, ``graph``,
``stage_messages``, ``node_session``, ``server_session``, ``unmask_cover`` and
``local_round`` (the protocol with no Flower); ``roster``, ``statements``, ``identity``,
``seen_sessions`` and ``active_checks`` (the active mode's trust anchor and checks); ``mod`` (node), ``strategy``,
``stage_exchange``, ``stage_records`` and ``synthetic_reply`` (coordinator); ``config`` and
``wire``.
"""

from privacy.secagg.config import SecAggConfig
from privacy.secagg.encoding import EncodingParams, quantisation_error_bound
from privacy.secagg.graph import SecAggAbort
from privacy.secagg.mod import make_secagg_mod, secagg_mod, strict_secagg_mod
from privacy.secagg.strategy import RoundReport, SecAggStrategy, wrap_strategy

__all__ = [
    "SecAggConfig",
    "EncodingParams",
    "quantisation_error_bound",
    "secagg_mod",
    "strict_secagg_mod",
    "make_secagg_mod",
    "SecAggAbort",
    "SecAggStrategy",
    "RoundReport",
    "wrap_strategy",
]
