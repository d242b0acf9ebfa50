"""Every config file of every group composes, resolves and points at something that exists."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import pytest
from omegaconf import OmegaConf

from conftest import CONF, REPO, compose_cfg

ROOTS = sorted(p.stem for p in CONF.glob("*.yaml"))


def _groups_of(root: str) -> list[str]:
    """Config groups a root config selects in its defaults list (hydra's own excluded)."""
    defaults = OmegaConf.load(CONF / f"{root}.yaml").get("defaults", [])
    names = [next(iter(d)) for d in defaults if OmegaConf.is_dict(d)]
    return [n for n in names if (CONF / n).is_dir() and n not in ("hydra", "experiment")]


# every choice of every group, composed under the first root config that uses the group
CHOICES = sorted({(g, f.stem): root for root in reversed(ROOTS) for g in _groups_of(root)
                  for f in (CONF / g).glob("*.yaml")}.items())
EXPERIMENTS = sorted(f.stem for f in (REPO / "experiments").glob("*.yaml"))
REQUIRED = {"data": {"folder": ["data.root=/some/photos"], "seg_folder": ["data.root=/some/photos"]}}


def test_every_group_is_used_by_a_root_config():
    used = {g for root in ROOTS for g in _groups_of(root)}
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment")}
    assert groups <= used, groups - used


@pytest.mark.parametrize(("choice", "root"), CHOICES, ids=[f"{r}:{g}={n}" for (g, n), r in CHOICES])
def test_every_group_choice_composes_and_resolves(choice, root, tmp_path):
    group, name = choice
    extra = REQUIRED.get(group, {}).get(name, [])
    cfg = compose_cfg(tmp_path, [f"{group}={name}", *extra], config_name=root)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    node = cfg.get(group)
    if node is not None and not OmegaConf.is_config(node):  # a `# @package _global_` group (task)
        node = None
    targets = [node.get("_target_")] if node is not None and "_target_" in node else [
        v.get("_target_") for v in (node or {}).values() if isinstance(v, dict) or OmegaConf.is_dict(v)]
    for target in filter(None, targets):
        assert hydra.utils.get_object(target), target


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    cfg = compose_cfg(tmp_path, [f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.model.backbone


def test_experiments_are_shipped():
    assert EXPERIMENTS, "experiments/ must hold at least one experiment config"
    assert (CONF / "experiment").resolve() == (REPO / "experiments").resolve()


def test_eval_config_composes(tmp_path):
    cfg = compose_cfg(tmp_path, ["ckpt_path=/x/checkpoints/last.ckpt"], config_name="eval")
    assert cfg.split == "test" and cfg.task_name == "eval"


def test_loggers_and_callbacks_instantiate(tmp_path):
    from visionsweep import builders

    pytest.importorskip("mlflow", reason="logger=many includes MLflow: pip install -e '.[dashboards]'")
    # paths.log_dir: the MLflow store (sqlite) is created as soon as its client is
    cfg = compose_cfg(tmp_path, ["logger=many", "callbacks=early_stopping", f"paths.log_dir={tmp_path}"])
    names = {type(lg).__name__ for lg in builders.build_loggers(cfg, tmp_path)}
    assert names == {"AtomicCSVLogger", "WandbLogger", "SweepTensorBoardLogger", "SweepMLFlowLogger"}
    assert (tmp_path / "mlflow.db").is_file()
    callbacks = {type(cb).__name__ for cb in builders.build_callbacks(cfg)}
    assert {"RunCheckpoint", "EarlyStopping", "LearningRateMonitor"} <= callbacks


def test_default_run_dir_is_timestamped_under_runs(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert "${now:" in OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    assert cfg.hydra.job.chdir is False
    assert Path(str(OmegaConf.to_container(cfg.paths)["log_dir"])).name == "runs"


def test_a_resumed_run_takes_what_shaped_it_from_its_own_config_and_refuses_a_contradiction(tmp_path):
    """ckpt_path=latest after a resnet18 run with the defaults saying resnet34: it resumes the resnet18."""
    from visionsweep.errors import ConfigError
    from visionsweep.run_config import adopt_resumed_run

    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    old = compose_cfg(run, ["model=resnet18", "data.image_size=24", "seed=7", "optimizer.lr=0.005",
                            "trainer.max_epochs=3", "data.num_workers=0"])
    (run / "config.yaml").write_text(OmegaConf.to_yaml(old, resolve=True))
    ckpt = run / "checkpoints" / "last.ckpt"

    cfg = compose_cfg(tmp_path / "new", ["ckpt_path=x", "data.num_workers=1", "data.image_size=auto"])
    adopt_resumed_run(cfg, ckpt, ["ckpt_path=x", "data.num_workers=1", "data.image_size=auto"])
    assert cfg.model.backbone == "resnet18" and cfg.data.image_size == 24 and cfg.seed == 7
    assert cfg.optimizer.lr == 0.005 and cfg.trainer.max_epochs == 3
    assert cfg.data.num_workers == 1  # how the data is loaded stays as given

    for override, key in (("model=vgg19", "model.backbone"), ("optimizer.lr=0.1", "optimizer.lr"),
                          ("data.batch_size=8", "data.batch_size")):
        cfg = compose_cfg(tmp_path / "new", ["ckpt_path=x", override])
        with pytest.raises(ConfigError, match=rf"trained with {key}=.*this run sets {key}=") as err:
            adopt_resumed_run(cfg, ckpt, ["ckpt_path=x", override])
        assert "\n" not in str(err.value) and f"drop {override.split('=')[0]}=" in str(err.value)
    # the same value as the run's is no contradiction; more epochs on another schedule may be asked for
    given = ["ckpt_path=x", "model=resnet18", "trainer.max_epochs=9", "scheduler=none"]
    cfg = compose_cfg(tmp_path / "new", given)
    adopt_resumed_run(cfg, ckpt, given)
    assert cfg.model.backbone == "resnet18" and cfg.trainer.max_epochs == 9 and cfg.scheduler.get("_target_") is None