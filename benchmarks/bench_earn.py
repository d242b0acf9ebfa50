"""The ``earn`` line of ``make bench`` (called by bench.py): does our OpenCV JPEG path pay for itself?

The training loader of a JPEG folder at 224 px (bench.py's generated 500x375 JPEGs, its augmentation, workers
and batch) is timed as shipped (``ours``: our JPEG-marker parser reads size and mode, ``cv2.imdecode`` decodes,
``data/images.py``) and with that path off (``pillow``: its workers decode every JPEG with Pillow, also reduced in
the decoder), in interleaved passes, medians compared. ``cv2_jpeg_ratio`` = ours / pillow; the issue's rule: a
part stays where it wins by >= 1.3x (``goal``). (The shared-memory slot transport, ``data/transport.py``, was
measured the same way against PyTorch's own queues at 1.00-1.05x on a 2-core CPU and was removed.)
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable


def bench_earn(a, root: Path, out: Path | None, emit: Callable, datamodule: Callable, epoch_rates: Callable
               ) -> list[dict]:
    from visionsweep.data import images

    loaders = {"ours": datamodule(root, a, "none").train_dataloader()}
    epoch_rates(loaders["ours"], 1)  # persistent workers started (forked) with the code as shipped
    fast = images._load_jpeg_cv2
    images._load_jpeg_cv2 = lambda path, min_short_side: None  # every JPEG to Pillow
    try:
        loaders["pillow"] = datamodule(root, a, "none").train_dataloader()
        epoch_rates(loaders["pillow"], 1)  # its workers fork now, with the OpenCV path off
    finally:
        images._load_jpeg_cv2 = fast
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(a.loader_repeats):
        for name, dl in loaders.items():
            rates[name] += epoch_rates(dl, 1)
    med = {name: statistics.median(r) for name, r in rates.items()}
    return [emit({"name": "cv2_jpeg_ratio", "ratio": round(med["ours"] / med["pillow"], 3), "goal": 1.3,
                  "part": "data/images.py OpenCV JPEG path + JPEG-marker parser", "image_size": a.loader_size,
                  "workers": a.workers, "batch_size": a.loader_batch_size,
                  "img_s": {name: round(v, 1) for name, v in med.items()}, "device": "cpu (loader only)"}, out)]
