"""visionsweep.optim: param groups, optimizer/scheduler set-up and stepping, and the EMA update."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from visionsweep.optim import GroupInfo, Optimization, build_scheduler, discriminative_lrs, param_groups


class _Trainer:
    """What Optimization.configure reads of a trainer."""

    def __init__(self, steps: int = 10, callbacks: list | None = None) -> None:
        self.estimated_stepping_batches, self.callbacks = steps, callbacks or []


def _net() -> nn.Module:
    import timm

    return timm.create_model("resnet10t", num_classes=3)


def test_norms_and_biases_are_not_decayed_unless_asked():
    net = _net()
    groups, infos = param_groups(net)
    assert [g["name"] for g in groups] == ["decay", "no_decay"] == [i.name for i in infos]
    decay, no_decay = groups
    assert "weight_decay" not in decay and no_decay["weight_decay"] == 0.0  # decay: the optimizer's config
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    (alone,), (info,) = param_groups(net, weight_decay_norm_bias=True)
    assert "name" not in alone and info == GroupInfo("decay") and len(alone["params"]) == len(list(net.parameters()))


def test_layerwise_groups_and_discriminative_lrs():
    groups, infos = param_groups(_net(), layerwise=True)
    names = [i.name for i in infos if not i.name.endswith("no_decay")]
    assert names[0] == "bn1+conv1" and names[-1] == "head" and len(names) == 6
    assert [g["name"] for g in groups] == [i.name for i in infos]
    assert infos[0].depth == 1.0 and infos[-1].depth == 0.0 and all(i.n_layers == 6 for i in infos)
    lrs = discriminative_lrs([GroupInfo(i.name, i.layer, i.n_layers, lr=0.01) for i in infos], lr_mult=100.0)
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(0.01)
    assert all(a <= b for a, b in zip(lrs, lrs[1:]))


def test_layer_groups_come_when_a_callback_asks_and_carry_the_configured_lr():
    class Asks:
        needs_layer_groups = True

    opt = Optimization({"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9})
    assert isinstance(opt.configure(_net(), _Trainer()), torch.optim.SGD) and len(opt.groups) == 2
    optimizer = opt.configure(_net(), _Trainer(callbacks=[Asks()]))
    assert len(opt.groups) == len(optimizer.param_groups) > 2
    assert all(i.lr == 0.05 for i in opt.groups)


def test_one_cycle_is_sized_from_the_trainer_with_a_warm_up_of_at_least_one_step():
    cfg = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.1, "pct_start": 0.25}
    configured = Optimization({"_target_": "torch.optim.AdamW", "lr": 0.1}, cfg).configure(_net(), _Trainer(100))
    assert configured["lr_scheduler"]["interval"] == "step"
    assert configured["lr_scheduler"]["scheduler"].total_steps == 100
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert build_scheduler(cfg, opt, 2).total_steps == math.ceil(2 / 0.25) + 1  # 2 steps: too short for 25 %
    cosine = build_scheduler({"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR"}, opt, 7)
    assert cosine.T_max == 7


def test_one_cycle_end_is_not_announced_on_a_normal_run():
    net = torch.nn.Linear(2, 2)
    sched = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD(net.parameters(), lr=0.1), max_lr=0.1,
                                                total_steps=5)
    opt = Optimization()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):  # a run of 5 steps steps its scheduler 5 times
            opt.step_scheduler(sched)
        ours = lambda: [str(w.message) for w in caught if "one-cycle" in str(w.message)]  # noqa: E731
        assert not ours() and sched.last_epoch == 5
        for _ in range(3):  # beyond the plan (a resume with more epochs): held, said once
            opt.step_scheduler(sched)
    assert ours() == [
        "the one-cycle schedule has ended (resumed with more epochs than planned?): "
        "the extra steps use its final learning rate"]
    assert sched.last_epoch == 5


def test_lr_finder_reads_train_bn_from_the_config():
    from omegaconf import OmegaConf

    from visionsweep.lr_find import finetune_train_bn

    node = {"_target_": "visionsweep.callbacks.finetune.FineTune", "freeze_epochs": 1}
    assert finetune_train_bn(OmegaConf.create({"callbacks": {"ckpt": None}})) is None
    assert finetune_train_bn(OmegaConf.create({"callbacks": {"finetune": node}})) is True  # FineTune's default
    assert finetune_train_bn(OmegaConf.create({"callbacks": {"finetune": {**node, "train_bn": False}}})) is False


def test_ema_foreach_update_equals_a_plain_per_tensor_update():
    from torch.optim.swa_utils import AveragedModel

    from visionsweep.callbacks.ema import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    ema = EMA(decay=0.9)
    averaged = AveragedModel(model, use_buffers=True, multi_avg_fn=ema._average)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    averaged.update_parameters(model)  # the first update copies
    for t in range(1, 30):  # past the warm-up: (1 + t) / (10 + t) reaches 0.9 at t = 80 / 10 = 8
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 8, 8))  # BatchNorm statistics and its int counter move too
        decay = min(0.9, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            reference[k] = decay * reference[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
        averaged.update_parameters(model)
    got = averaged.module.state_dict()
    for k, v in reference.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert got["1.num_batches_tracked"] == 29


def test_fused_from_the_defaults_is_dropped_for_optimizers_without_fused_kernels():
    """optimizer._target_=torch.optim.RMSprop with adamw.yaml's fused: true still builds (RMSprop has no fused)."""
    from visionsweep.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(build_optimizer({"_target_": "torch.optim.RMSprop", "lr": 0.01, "fused": True}, params),
                      torch.optim.RMSprop)
    fused = build_optimizer({"_target_": "torch.optim.AdamW", "lr": 0.01, "fused": True}, params)
    assert fused.defaults["fused"] is True
