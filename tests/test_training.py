"""The training objective on the tiny model: it learns, freezes what it must, corrupts as configured."""

import pytest
import torch

from astra.config import DiffusionConfig, derive
from astra.diffusion.flow import loss_weight, noise_as_mask
from astra.model import mark_trainable, pack_chunk, plan_chunk
from astra.train.objective import training_loss


def _batch(cfg, batch=2, history=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    fp = cfg.model.framepack
    plan = plan_chunk(history, fp)
    inputs = pack_chunk(
        plan,
        torch.randn(batch, 4, history, 8, 8, generator=g),
        torch.randn(batch, history + fp.target_frames, 12, generator=g),
        torch.randn(batch, 5, 384, generator=g),
        torch.tensor([0, 1][:batch]),
    )
    return torch.randn(batch, 4, fp.target_frames, 8, 8, generator=g), inputs


def test_overfits_fixed_batch_and_keeps_frozen_weights(tiny_config, tiny_model):
    model = tiny_model.train()
    counts = mark_trainable(model)
    assert counts.trainable > 0 and counts.frozen > 0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    target, inputs = _batch(tiny_config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(80):
        # the same noise, timesteps and corruption every step: a fixed objective to overfit
        stats = training_loss(
            model,
            target,
            inputs,
            tiny_config.diffusion,
            tiny_config.model.actions,
            torch.Generator().manual_seed(7),
        )
        opt.zero_grad()
        stats.loss.backward()
        opt.step()
        losses.append(stats.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    changed = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])
    ]
    # every trained family moved: self-attention, adapter, experts, action encoder, history embedders
    for family in ("attn1", "projector", "moe", "action_encoder", "clean_x_embedder"):
        assert any(family in n for n in changed), family


def test_noise_as_mask_rate_and_level_match_the_reference():
    cfg = DiffusionConfig()
    x = torch.zeros(20_000, 3)
    g = torch.Generator().manual_seed(0)
    (out,), mask, sigma = noise_as_mask([x], [1], cfg, g)
    rate = mask.float().mean().item()
    assert abs(rate - 0.8) < 0.02, rate
    # the reference: sigma = shift_5(u), u ~ U[0.25, 1] -> [0.625, 1], median shift_5(0.625) = 0.893
    level = sigma[mask]
    assert level.min() >= 0.625 - 1e-6 and level.max() <= 1.0 and torch.all(sigma[~mask] == 0)
    for q, u in ((0.1, 0.325), (0.5, 0.625), (0.9, 0.925)):  # quantiles map through the shift
        want = 5 * u / (1 + 4 * u)
        assert abs(level.quantile(q).item() - want) < 0.01, (q, level.quantile(q).item(), want)
    assert torch.equal(out[~mask], x[~mask])  # untouched samples stay clean
    # with x = 0 the corrupted value is sigma * eps: its spread per sample matches sigma
    assert out[mask].abs().mean() > 0.5


def test_noise_as_mask_corrupts_only_the_configured_scales():
    x = [torch.zeros(4000, 3) for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    (four, two, one), mask, _ = noise_as_mask(x, [4, 2, 1], DiffusionConfig(), g)  # default: 1x only
    assert torch.equal(four, x[0]) and torch.equal(two, x[1]) and one[mask].abs().mean() > 0.5
    every = DiffusionConfig(noise_as_mask_scales=("4x", "2x", "1x"))
    out, mask, _ = noise_as_mask(x, [4, 2, 1], every, g)
    assert all(o[mask].abs().mean() > 0.5 for o in out)


def test_objective_applies_configured_rates(tiny_config, tiny_model):
    cfg = derive(tiny_config.diffusion, {"noise_as_mask_prob": 0.5, "action_dropout_prob": 0.25})
    target, inputs = _batch(tiny_config, batch=2)
    noised, dropped = [], []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(150):
            stats = training_loss(tiny_model, target, inputs, cfg, tiny_config.model.actions, g)
            noised.append(stats.history_noised)
            dropped.append(stats.actions_dropped)
    noised, dropped = torch.cat(noised).float().mean(), torch.cat(dropped).float().mean()
    assert abs(noised - 0.5) < 0.1 and abs(dropped - 0.25) < 0.1, (noised, dropped)


def test_action_dropout_zeroes_actions_flags_and_presence(tiny_config):
    _, inputs = _batch(tiny_config)
    dropped = inputs.without_actions(torch.tensor([True, False]))
    for g in (*dropped.history, dropped.target):
        assert torch.all(g.actions[0] == 0) and torch.all(g.flags[0] == 0) and torch.all(g.present[0] == 0)
        assert torch.all(g.present[1] == 1)
    assert torch.equal(dropped.history[0].actions[1], inputs.history[0].actions[1])
    assert torch.all(dropped.history[0].flags[1] == 1)


@pytest.mark.parametrize("routing", ["hard", "learned"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, tiny_wan, routing):
    from astra.model import AstraTransformer

    cfg = derive(tiny_config.model, {"actions": {"routing": routing}})
    model = AstraTransformer.from_wan(tiny_wan, cfg)
    mark_trainable(model)
    target, inputs = _batch(tiny_config)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        stats = training_loss(
            model, target, inputs, tiny_config.diffusion, cfg.actions, torch.Generator().manual_seed(3)
        )
        stats.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)
    if routing == "learned":
        assert "action_encoder.router.weight" in grads[0]


def test_loss_weights():
    sigma = torch.linspace(0.001, 1, 101)
    assert torch.all(loss_weight(sigma, "uniform", 5.0) == 1)
    w = loss_weight(sigma, "bell", 5.0)
    assert torch.all(w >= 0) and w[50] > w[0] and w[50] > w[-1]  # mid-range timesteps count most


def test_learned_routing_reports_expert_usage(tiny_config, tiny_wan):
    from astra.config import derive
    from astra.model import AstraTransformer

    cfg = derive(tiny_config, ["model.actions.routing=learned"])
    model = AstraTransformer.from_wan(tiny_wan, cfg.model)
    target, inputs = _batch(cfg)
    stats = training_loss(
        model, target, inputs, cfg.diffusion, cfg.model.actions, torch.Generator().manual_seed(0)
    )
    usage = stats.expert_usage
    assert usage.shape == (cfg.model.actions.num_experts,) and abs(usage.sum().item() - 1.0) < 1e-5
    assert (usage > 0).sum() >= cfg.model.actions.top_k  # top-2 of 4 experts share every row


def test_lr_scale_groups_the_trainables_and_a_checkpoint_restores_every_group(tiny_model, tmp_path):
    """``optim.lr_scale``: matching parameters form their own AdamW group at a multiple of the lr;
    the sharded checkpoint saves and restores both groups' state."""
    from astra.train import checkpoint as ckpt
    from astra.train.config import load_train_config
    from astra.train.loop import param_groups

    cfg = load_train_config(None, ["preset=tiny", "optim.lr_scale={'moe|action_encoder': 10}"])
    mark_trainable(tiny_model, cfg.trainable)
    groups = param_groups(tiny_model, cfg)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    by_scale = {g["lr_scale"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert set(by_scale) == {1.0, 10.0}
    assert by_scale[10.0] and all(("moe" in n or "action_encoder" in n) for n in by_scale[10.0])
    assert not any(("moe" in n or "action_encoder" in n) for n in by_scale[1.0])
    assert sum(map(len, by_scale.values())) == sum(p.requires_grad for p in tiny_model.parameters())

    opt = torch.optim.AdamW(groups, lr=1e-3)
    tiny_model.train()
    for seed in range(2):
        target, inputs = _batch(cfg.astra, seed=seed)
        training_loss(
            tiny_model, target, inputs, cfg.astra.diffusion, cfg.astra.model.actions
        ).loss.backward()
        opt.step()
    ckpt.save(tmp_path / "c", tiny_model, opt, {"step": 2}, 0, cfg.trainable)
    saved = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    for state in opt.state.values():  # wipe, then restore from the checkpoint
        for v in state.values():
            v.zero_() if torch.is_tensor(v) else None
    assert ckpt.load(tmp_path / "c", tiny_model, opt, cfg.trainable) == {"step": 2}
    restored = opt.state_dict()
    assert [g["lr_scale"] for g in restored["param_groups"]] == [g["lr_scale"] for g in groups]
    for k, v in saved.items():
        torch.testing.assert_close(restored["state"][k]["exp_avg"], v)
    assert any(float(v.abs().max()) > 0 for v in saved.values())


def test_lr_scale_names_a_bad_pattern():
    from astra.config import ConfigError
    from astra.train.config import load_train_config

    with pytest.raises(ConfigError, match="lr_scale"):
        load_train_config(None, ["preset=tiny", "optim.lr_scale={'moe(': 10}"])
    with pytest.raises(ConfigError, match="lr_scale"):
        load_train_config(None, ["preset=tiny", "optim.lr_scale={'moe': 0}"])


def test_every_preset_logs_as_mlflow_params(tmp_path):
    """The job logs the whole config as MLflow params: the demo preset's ``optim.lr_scale`` regex keys
    are no valid param names, so that dict is one param (JSON); a real MLflow store takes them all."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from astra.train.config import TRAIN_PRESETS, load_train_config
    from astra.train.tracking import _flatten

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("presets"))
    for name in TRAIN_PRESETS:
        params = _flatten(load_train_config(None, [f"preset={name}"]).model_dump(mode="json"))
        items = [mlflow.entities.Param(f"{name}/{k}", v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=items[i : i + 100])
    logged = client.get_run(run.info.run_id).data.params
    assert logged["demo/optim.lr_scale"] == '{"\\\\.moe\\\\.|^action_encoder\\\\.": 10.0}'
