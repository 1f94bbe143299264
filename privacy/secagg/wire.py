"""Names that cross the wire for secure aggregation, in one place.

Every secure-aggregation message is a Flower ``train`` message whose content holds a
ConfigRecord under :data:`RECORD`; its ``stage`` entry says which stage it is. Stage messages
are ``train`` messages (not ``query.secagg``) because a ClientApp routes by message type
*before* mods run, and mods wrap only registered handlers: a ``train`` message always reaches
``secagg_mod`` through the app's ``@app.train()`` handler, with no extra registration.
"""

from __future__ import annotations

__all__ = [
    "RECORD",
    "RECORD_NEXT",
    "MASKED_RECORD",
    "MASKED_ARRAY",
    "STATE_SESSION",
    "STATE_SESSION_NEXT",
    "STATE_CHANNEL",
    "STAGE",
    "ADVERTISE",
    "SHARE_KEYS",
    "MASKED_INPUT",
    "UNMASK",
    "CONSISTENCY",
    "ACTIVE",
    "SEMI_HONEST",
    "ADVERSARIES",
]

ACTIVE = "active"  # secagg.adversary: authenticated keys, a consistency check, a threshold above 2n/3
SEMI_HONEST = "semi-honest"  # secagg.adversary: an honest-but-curious coordinator
ADVERSARIES = (ACTIVE, SEMI_HONEST)

RECORD = "secagg"  # ConfigRecord of every stage message and reply
RECORD_NEXT = "secagg.next"  # ConfigRecord of the next round's share-keys stage, riding on a TRAIN message
MASKED_RECORD = "secagg.masked"  # ArrayRecord of a masked-input reply
MASKED_ARRAY = "y"  # its single Array: the masked vector
STATE_SESSION = "secagg.session"  # ctxt.state ConfigRecord: the session that masked (wiped after unmask)
STATE_SESSION_NEXT = "secagg.session.next"  # ctxt.state ConfigRecord: a session whose keys are shared
STATE_CHANNEL = "secagg.channel"  # ctxt.state ConfigRecord: the node's long-lived channel key pair

STAGE = "stage"
ADVERTISE = "advertise"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"
CONSISTENCY = "consistency"  # active mode, only after a masked-input dropout: sign the survivor set

# Keys inside the RECORD ConfigRecord.
SESSION = "session"
ROUND = "server-round"
INDEX = "index"
THRESHOLD = "threshold"
NEIGHBOURS = "neighbours"
CHANNEL_PKS = "channel-pks"
CHANNEL_PK = "channel-pk"
MASK_PK = "mask-pk"
MASK_PKS = "mask-pks"
COMMITMENT = "commitment"
DESTINATIONS = "destinations"
SOURCES = "sources"
CIPHERTEXTS = "ciphertexts"
CLIP_RANGE = "clip-range"
BITS = "bits"
MAX_WEIGHT = "max-weight"
MAX_NODES = "max-nodes"
WEIGHT_KEY = "weight-key"
ARRAYS_KEY = "arrays-key"
SURVIVORS = "survivors"
DROPPED = "dropped"
B_SOURCES = "b-sources"
B_SHARES = "b-shares"
SK_SOURCES = "sk-sources"
SK_SHARES = "sk-shares"
ADVERSARY = "adversary"  # in a share-keys record: the mode the coordinator runs
MEMBER = "member"  # roster fingerprint (advertise reply)
ROSTER_SIZE = "roster-size"  # members in the node's roster (advertise reply): sizes the active threshold
ROSTER_DIGEST = "roster-digest"
SIGNATURE = "signature"  # a roster signature: on a channel key (advertise), U2 (masked input), U3 (consistency)
MEMBERS = "members"  # share-keys: the neighbours' roster fingerprints, in NEIGHBOURS' order
CHANNEL_SIGS = "channel-sigs"
NONCE = "nonce"
NONCES = "nonces"
COMMITMENTS = "commitments"
SIGNATURES = "signatures"
U2_INDICES = "u2"  # masked input: every node of U2, with its member fingerprint and nonce
U2_MEMBERS = "u2-members"
U2_NONCES = "u2-nonces"
U3_INDICES = "u3"  # consistency and unmask: the survivor set
SIGNERS = "signers"
ERROR = "error"  # in a pipelined share-keys reply: why the node could not start the next session
# In an advertise reply to another stage: the node's channel key is not the one the coordinator
# holds (it restarted and made a new one); it sits this stage's session out and rejoins with this key.
REJOIN = "rejoin"
