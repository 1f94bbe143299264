"""The global model: a SASRec-style next-item transformer from ``transformers`` BERT blocks.

Item-ID embeddings (optionally plus projected, frozen all-MiniLM-L6-v2 title
embeddings) go through causal BERT layers; an ``nn.Linear`` head scores every
item of the catalog; the loss is full-softmax cross-entropy at every position.
:class:`TextTowerSASRec` (``model=sasrec_text``) replaces the ID embeddings and the head
by one tied text tower (projected frozen text embeddings plus an ID residual), which
ranks an item from its text alone before anyone has interacted with it.

Made to run under Opacus as it stands (see DESIGN.md):

* ``position_ids``/``token_type_ids`` are materialised per example (``repeat``,
  not ``expand``), otherwise Opacus fails with "stack expects each tensor to be
  equal size";
* logits come from an ``nn.Linear`` head, never ``h @ emb.weight.T``, so every
  parameter's gradient passes through Opacus's per-sample hooks and clipping (the
  tower's tied scores are the exception: only fedmart's ``bk`` mode clips them, exactly);
* ``forward(..., reduction="none")`` gives one loss per example (per user), which
  ghost clipping needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from privacy.bookkeeping import tag_rows
from privacy.tied import TiedEmbedding

__all__ = ["SASRecConfig", "SASRec", "TextTowerSASRec", "create"]


@dataclass
class SASRecConfig:
    num_items: int  # real items; index 0 is padding
    max_len: int = 50
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    attn_dropout: float = 0.2
    text_dim: int = 0  # >0: width of the frozen text embeddings (added to the IDs; the tower's features)
    label_smoothing: float = 0.0  # of the training cross-entropy (0 = plain CE)
    tower: bool = False  # TextTowerSASRec: tied text tower items (needs text_dim)
    item_bias: bool = True  # the tower's per-item score bias
    id_dropout: float = 0.0  # the tower's ID dropout: share of items trained on their text alone each step

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError("num_items must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.tower and not self.text_dim:
            raise ValueError("tower=True needs text_dim > 0 (the width of the frozen text embeddings)")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), not {self.id_dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class SASRec(nn.Module):
    """Item-ID embeddings (plus projected title embeddings with ``text_dim``) and an ``nn.Linear`` head."""

    # The first catalog index the output scores: 0 scores the padding column too (training
    # pushes it down); the tied tower scores items 1..n only.
    first_scored = 0

    def __init__(self, config: SASRecConfig, text_embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        if config.tower and not isinstance(self, TextTowerSASRec):
            raise ValueError("config.tower describes a TextTowerSASRec: build it with federation.model.create")
        self.config = config
        c = config
        self._init_items(c, text_embeddings)
        bert_cfg = BertConfig(
            vocab_size=1,  # unused: we feed inputs_embeds
            hidden_size=c.hidden,
            num_hidden_layers=c.layers,
            num_attention_heads=c.heads,
            intermediate_size=4 * c.hidden,
            hidden_dropout_prob=c.dropout,
            attention_probs_dropout_prob=c.attn_dropout,
            max_position_embeddings=c.max_len,
            type_vocab_size=1,
            is_decoder=True,  # causal self-attention
            use_cache=False,
        )
        self.encoder = BertModel(bert_cfg, add_pooling_layer=False)
        # Unused (we feed inputs_embeds): frozen, because a trainable parameter that never
        # gets a gradient has no per-sample gradient either and Opacus's optimizer rejects it.
        self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        self._init_output(c)

    def _init_items(self, c: SASRecConfig, text_embeddings: torch.Tensor | None) -> None:
        self.item_emb = nn.Embedding(c.num_items + 1, c.hidden, padding_idx=0)
        if c.text_dim:
            _check_text(c, text_embeddings)
            # Frozen and not a parameter: never trained, never sent over the wire.
            self.register_buffer("text_emb", text_embeddings.float(), persistent=False)
            self.text_proj = nn.Linear(c.text_dim, c.hidden)

    def _init_output(self, c: SASRecConfig) -> None:
        self.head = nn.Linear(c.hidden, c.num_items + 1)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """(b, t) item indices -> (b, t, d) input embeddings."""
        x = self.item_emb(seq)  # (b, t, d)
        if self.config.text_dim:
            x = x + self.text_proj(self.text_emb[seq])  # (b, t, d)
        return x

    def item_scores(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) states -> (..., n + 1 - first_scored) scores of items ``first_scored..n``."""
        return self.head(h)

    def full_scores(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., n + 1) scores with the padding column at -inf."""
        scores = self.item_scores(h)
        if self.first_scored:
            return self._padded_columns(scores)
        return scores.masked_fill(_pad_column(scores), float("-inf"))

    def hidden_states(self, seq: torch.Tensor) -> torch.Tensor:
        """(b, t) item indices, left-padded with 0 -> (b, t', d) causal states of the last t' positions.

        Columns that are padding in every row are dropped first (t' <= t): left padding
        puts them at the start, and positions keep their absolute index, so the states of
        the kept positions are exactly those of the full batch, for less work.
        """
        b, t = seq.shape
        real = (seq > 0).any(0)  # (t,)
        start = int(real.int().argmax()) if bool(real.any()) else t - 1
        seq = seq[:, start:].contiguous()  # (b, t'); contiguous: Opacus's ghost embedding sampler view()s it
        x = self.embed(seq)  # (b, t', d)
        pos = torch.arange(start, t, device=seq.device).repeat(b, 1)  # (b, t'), materialised for Opacus
        token_type = torch.zeros_like(seq)  # (b, t')
        mask = (seq > 0).long()  # (b, t'), pads neither attend nor are attended
        return self.encoder(
            inputs_embeds=x, attention_mask=mask, position_ids=pos, token_type_ids=token_type
        ).last_hidden_state

    def forward(
        self, seq: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, loss)``: scores for the next item, and the loss if ``targets`` is given.

        Parameters
        ----------
        seq : (b, t) long
        targets : (b, t) long, 0 where there is nothing to predict
        reduction : "mean" (mean over all target positions) or "none" (one loss per
            example: mean over that example's positions, shape (b,), as Opacus needs)

        Returns
        -------
        logits : the scores of the positions the loss is taken over: every kept position,
            (b, t', num_items + 1), without targets (padding column forced to -inf) or with
            ``reduction="none"``; with ``reduction="mean"`` only the positions that have a
            target, (v, num_items + 1), because padding is half or more of a batch. t' <= t:
            leading columns that are padding in every row are not scored (:meth:`hidden_states`).
        loss : scalar, (b,), or None

        DP's one-pass ``bk`` clipping uses :meth:`packed_loss` instead.
        """
        h = self.hidden_states(seq)  # (b, t', d): all-padding leading columns dropped
        if targets is not None:
            targets = targets[:, seq.shape[1] - h.shape[1] :]  # pads of input and target line up
        if targets is None:
            return self.full_scores(h), None  # (b, t, n + 1)
        first = self.first_scored
        # SASRec keeps the padding column in the softmax: no target is 0, so training simply
        # pushes it down, and we avoid a masked copy of the largest tensor.
        if reduction == "mean":
            # Score only positions with a target: pads are half or more of a batch. Not
            # used under DP, where Opacus needs every activation to keep its batch dimension.
            valid = targets > 0  # (b, t)
            logits = self.item_scores(h[valid])  # (v, n + 1 - first)
            loss = F.cross_entropy(logits, targets[valid] - first, label_smoothing=self.config.label_smoothing)
            return self._padded_columns(logits), loss
        if reduction != "none":
            raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
        b, t = targets.shape
        logits = self.item_scores(h)  # (b, t, n + 1 - first)
        ce = F.cross_entropy(
            logits.reshape(b * t, -1),
            targets.reshape(-1) - first,  # a column slice after trimming: not viewable as one row
            ignore_index=-first,  # the padding target
            reduction="none",
            label_smoothing=self.config.label_smoothing,
        )
        valid = (targets > 0).float()  # (b, t)
        return self._padded_columns(logits), (ce.view(b, t) * valid).sum(1) / valid.sum(1).clamp(min=1)  # (b,)

    def _padded_columns(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores of items ``first_scored..n`` -> all n + 1 columns (unscored ones at -inf)."""
        if not self.first_scored:
            return logits
        pad = logits.new_full((*logits.shape[:-1], self.first_scored), float("-inf"))
        return torch.cat([pad, logits], -1)

    def packed_loss(self, seq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example loss (b,) for DP's one-pass ``bk`` clipping (``privacy/bookkeeping.py``).

        Scores only the positions that have a target, as ``reduction="mean"`` does, and tags
        the packed head input with each row's example (``privacy.bookkeeping.tag_rows``), so
        that the head's per-user gradient norms can be taken on the packed rows. Opacus's own
        modes need the unpacked (b, t, ...) head of ``forward(..., reduction="none")``.
        """
        h = self.hidden_states(seq)  # (b, t', d)
        targets = targets[:, seq.shape[1] - h.shape[1] :]  # pads of input and target line up
        b = targets.shape[0]
        valid = targets > 0  # (b, t')
        owner = valid.nonzero()[:, 0]  # (v,): the example of each scored row, non-decreasing
        logits = self.item_scores(tag_rows(h[valid], owner))  # (v, n + 1 - first)
        ce = F.cross_entropy(
            logits, targets[valid] - self.first_scored, reduction="none", label_smoothing=self.config.label_smoothing
        )
        per_example = torch.zeros(b, dtype=ce.dtype, device=ce.device).index_add(0, owner, ce)  # (b,)
        return per_example / valid.sum(1).clamp(min=1)

    @torch.no_grad()
    def score_last(self, seq: torch.Tensor) -> torch.Tensor:
        """(b, t) histories -> (b, n + 1) scores for the next item after the last position."""
        h = self.hidden_states(seq)[:, -1]  # (b, d): left padding puts the newest item last
        return self.full_scores(h)


class TextTowerSASRec(SASRec):
    """SASRec whose items are a text tower, tied between input and output (``model=sasrec_text``).

    Item ``i`` is ``e_i = P t_i + r_i``: ``t_i`` the frozen all-MiniLM-L6-v2 embedding of its
    catalog text, ``P`` a learned projection shared by every item (and every node), ``r_i`` a
    learned ID residual that starts at zero. The encoder's input is ``e`` of each history
    item, and the score of item ``i`` is ``h . e_i + b_i`` (``b_i`` a per-item bias, zero at
    the start, with ``item_bias``), so an item no one has interacted with is ranked by its text
    alone. With ``id_dropout`` a training step ranks a random share of the items by their text alone
(their residual and bias dropped at both ends), so that the text path stands on its own for
the items that have no residual yet. The padding row is zero and never scored. All of it is one
    :class:`privacy.tied.TiedEmbedding` (``tower``), which DP-SGD clips exactly in mode ``bk``.
    """

    first_scored = 1

    def _init_items(self, c: SASRecConfig, text_embeddings: torch.Tensor | None) -> None:
        if not c.text_dim:
            raise ValueError("the text tower needs text_dim > 0 (the width of the frozen text embeddings)")
        _check_text(c, text_embeddings)
        self.tower = TiedEmbedding(
            text_embeddings, c.hidden, padding_idx=0, bias=c.item_bias, id_dropout=c.id_dropout
        )

    def _init_output(self, c: SASRecConfig) -> None:
        """Tied: the output is the tower itself."""

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        # Every forward embeds once, before it scores: the step's ID-dropout mask is drawn here,
        # so the lookups and the scores of one step drop the same items.
        self.tower.sample_keep()
        return self.tower(seq)  # (b, t, d)

    def item_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.tower.scores(h)  # (..., n)


def create(config: SASRecConfig, text_embeddings: torch.Tensor | None = None) -> SASRec:
    """The model ``config`` describes: :class:`TextTowerSASRec` when ``config.tower``, else :class:`SASRec`."""
    return (TextTowerSASRec if config.tower else SASRec)(config, text_embeddings=text_embeddings)


def _check_text(c: SASRecConfig, text_embeddings: torch.Tensor | None) -> None:
    if text_embeddings is None or text_embeddings.shape != (c.num_items + 1, c.text_dim):
        raise ValueError(f"text_dim={c.text_dim} needs text_embeddings of shape ({c.num_items + 1}, {c.text_dim})")


def _pad_column(logits: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask[0] = True
    return mask
