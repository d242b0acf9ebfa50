"""Can a classifier's probabilities be trusted: ECE, NLL, Brier score, reliability bins, temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T`` fitted on the validation
logits (LBFGS on the NLL); the argmax, hence accuracy, is unchanged. The temperature is a buffer of
:class:`~visionsweep.models.classifier.ClassifierModule`, so the checkpoint carries it and predict, TTA and
export apply it through ``model.probabilities``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

log = logging.getLogger("visionsweep.calibration")
N_BINS = 15  # equal-width confidence bins, as in Guo et al. and torchmetrics' default
T_RANGE = (0.05, 20.0)  # a temperature outside this range means the fit went wrong (or the logits are degenerate)


def brier(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample multi-class Brier score: ``sum_c (p_c - 1[c = y])^2`` (0 = perfect, 2 = confidently wrong)."""
    onehot = F.one_hot(targets.long(), probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(dim=1)


def scores(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
           n_bins: int = N_BINS) -> dict[str, float]:
    """ECE (``n_bins`` equal-width bins, L1), NLL and mean Brier score of ``softmax(logits / temperature)``.

    Args:
        logits: ``N x C`` logits.
        targets: ``N`` class indices.
        temperature: divides the logits.
        n_bins: confidence bins of the ECE.

    Returns:
        ``{"ece", "nll", "brier", "acc"}`` as floats.
    """
    z = logits.double() / float(temperature)
    probs = z.softmax(dim=1)
    y = targets.long()
    ece = multiclass_calibration_error(probs, y, num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    return {"ece": float(ece), "nll": float(F.cross_entropy(z, y)), "brier": float(brier(probs, y).mean()),
            "acc": float((probs.argmax(dim=1) == y).double().mean())}


def reliability(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = N_BINS) -> dict[str, Any]:
    """Reliability-diagram bins of class probabilities: see :func:`reliability_bins`.

    Args:
        probs: ``N x C`` class probabilities.
        targets: ``N`` class indices.
        n_bins: number of bins on [0, 1].
    """
    conf, pred = probs.double().max(dim=1)
    return reliability_bins(conf, pred == targets.long(), n_bins)


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = N_BINS) -> dict[str, Any]:
    """Per equal-width bin of the top-class confidence: its count, mean confidence and accuracy (None for an
    empty bin). Bins are ``[lo, hi)`` as in torchmetrics' ECE, which gives a confidence of exactly 1 (a saturated
    float32 softmax) a slot of its own: ``at_one``, so that the ECE of these bins is the logged ``*/ece``.

    Args:
        confidence: ``N`` top-class probabilities.
        correct: ``N`` booleans (or 0/1): the top class was right.
        n_bins: number of bins on [0, 1].

    Returns:
        ``{"n_bins", "count", "confidence", "accuracy"}`` (lists of ``n_bins`` JSON-able values) and
        ``at_one: {"count", "accuracy"}``.
    """
    conf, right = confidence.double().flatten(), correct.double().flatten()
    one = conf >= 1.0
    ones = {"count": int(one.sum()), "accuracy": round(float(right[one].mean()), 6) if one.any() else None}
    conf, right = conf[~one], right[~one]
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf, edges[1:-1], right=True)
    count = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, right)
    mean = lambda s: [round(float(v / n), 6) if n else None for v, n in zip(s, count)]  # noqa: E731
    return {"n_bins": n_bins, "count": count.tolist(), "confidence": mean(conf_sum), "accuracy": mean(acc_sum),
            "at_one": ones}


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (LBFGS on ``log T``, from T = 1).

    Args:
        logits: ``N x C`` validation logits.
        targets: ``N`` class indices.
        max_iter: LBFGS iterations.

    Returns:
        ``T`` clipped to :data:`T_RANGE` (1.0 when the logits give no signal, e.g. a single sample).
    """
    z, y = logits.detach().double().cpu().clone(), targets.detach().long().cpu().clone()  # (not inference tensors)
    if len(z) < 2:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may sit in inference_mode / no_grad
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not torch.isfinite(torch.tensor(t)):
        log.warning("temperature scaling did not converge: kept T = 1")
        return 1.0
    return min(max(t, T_RANGE[0]), T_RANGE[1])


@torch.no_grad()
def collect_logits(model: torch.nn.Module, loader: Any, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and targets of ``loader`` through ``model`` (eval mode; the model's own temperature unused).

    Args:
        model: a ClassifierModule (its ``forward`` takes the loader's uint8 images).
        loader: yields ``(images, targets)``.
        device: where to run.

    Returns:
        ``(N x C float32 logits, N targets)`` on the CPU.
    """
    was_training = model.training
    model.eval().to(device)
    logits, targets = [], []
    try:
        for x, y in loader:
            logits.append(model(x.to(device)).float().cpu())
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def calibrate(model: Any, val: tuple[torch.Tensor, torch.Tensor], measure: tuple[torch.Tensor, torch.Tensor],
              measured_on: str) -> dict[str, Any]:
    """Fit the temperature on ``val`` logits, set it on ``model`` and score ``measure`` before and after.

    Args:
        model: a single-label ClassifierModule (its ``temperature`` buffer is set).
        val: validation ``(logits, targets)`` to fit on.
        measure: ``(logits, targets)`` the before/after figures are measured on (test, else val).
        measured_on: the name of that split.

    Returns:
        run.json's ``calibration``: ``temperature``, ``fitted_on``, ``measured_on``, ``<ece|nll|brier>_before``
        and ``_after``; and ``bins_before`` (reliability bins at the model's temperature before this fit).
    """
    t0 = float(model.temperature)  # 1, or what an earlier calibration stored: "before" is the model as it was
    t = fit_temperature(*val)
    before, after = scores(*measure, temperature=t0), scores(*measure, temperature=t)
    model.temperature.fill_(t)
    out: dict[str, Any] = {"temperature": round(t, 6), "fitted_on": "val", "measured_on": measured_on,
                           "n_fit": len(val[1]), "n_measured": len(measure[1])}
    for key in ("ece", "nll", "brier"):
        out[f"{key}_before"], out[f"{key}_after"] = round(before[key], 6), round(after[key], 6)
    out["bins_before"] = reliability((measure[0].double() / t0).softmax(dim=1), measure[1])
    return out


def calibrate_checkpoint(model: Any, dm: Any, ckpt: str | None, device: torch.device | str) -> dict[str, Any]:
    """Temperature scaling of a trained run: load ``ckpt``'s weights, fit T on val, write T into ``ckpt``.

    The checkpoint is rewritten atomically with the temperature in its ``state_dict`` (and the record
    under ``visionsweep.calibration``), so testing it afterwards, predict, TTA and export all use it.

    Args:
        model: the single-label ClassifierModule that trained.
        dm: its data module (val, and test when it has one).
        ckpt: the best checkpoint (None or "": the model as it stands is calibrated, nothing is written).
        device: where to run the model.

    Returns:
        run.json's ``calibration`` (see :func:`calibrate`).
    """
    from visionsweep import checkpoints
    from visionsweep.errors import ConfigError
    from visionsweep.utils.atomic import atomic_open

    if getattr(model, "multilabel", False) or not hasattr(model, "temperature"):
        raise ConfigError("calibrate=true fits a softmax temperature: it works with single-label classifiers "
                          "(task=classify), not with task=multilabel or segment")
    ck = None
    if ckpt:
        ck = checkpoints.read(ckpt)
        model.on_load_checkpoint(ck)
        model.load_state_dict(ck["state_dict"])
    split = "test" if dm.has_test else "val"
    val = collect_logits(model, dm.val_dataloader(), device)
    measure = collect_logits(model, dm.test_dataloader(), device) if split == "test" else val
    record = calibrate(model, val, measure, split)
    if ck is not None:
        ck["state_dict"]["temperature"] = model.temperature.detach().cpu().clone()
        ck.setdefault("visionsweep", {})["calibration"] = {k: v for k, v in record.items() if k != "bins_before"}
        with atomic_open(ckpt, "wb") as f:
            torch.save(ck, f)
    log.info("temperature scaling: T = %.4f; on %s ECE %.4f -> %.4f, NLL %.4f -> %.4f", record["temperature"],
             split, record["ece_before"], record["ece_after"], record["nll_before"], record["nll_after"])
    return record
