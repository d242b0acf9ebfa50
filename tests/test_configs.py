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


def test_a_resumed_auto_size_run_goes_on_at_the_size_it_was_trained_at(tmp_path):
    """data.image_size=auto + ckpt_path: the trained run's config.yaml says 32 (the old digits default)."""
    from visionsweep.run_config import _trained_image_size

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("data:\n  image_size: 32\n")
    assert _trained_image_size(tmp_path / "checkpoints" / "last.ckpt") == 32
    (tmp_path / "config.yaml").write_text("data:\n  image_size: auto\n")
    assert _trained_image_size(tmp_path / "checkpoints" / "last.ckpt") is None
