"""Snakemake script of rule `train`: one fold of a MIL model on the Zarr feature stores
(slidesnake.stages.train_job)."""

import torch

from slidesnake.bags import NonFiniteError
from slidesnake.errors import one_line_errors
from slidesnake.exclusion import mode_of
from slidesnake.io import setup_logging
from slidesnake.stages import train_job
from slidesnake.store import MixedEncodersError

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
torch.set_num_threads(max(1, int(sm.threads)))
# NaN / Inf features or a non-finite loss stop the job with one line naming the slide (and fold and epoch).
with one_line_errors(log, also=(NonFiniteError, MixedEncodersError)):
    train_job(features=list(sm.input.features), splits=sm.input.splits, samples=sm.input.samples,
              fold=int(sm.params.fold), classes=list(sm.params.classes), model=sm.params.model,
              # training.device and training.tensorboard are run-shaping: read from the config (no reruns)
              model_kwargs=sm.params.model_kwargs,
              training={**dict(sm.params.training or {}), "device": sm.config["training"]["device"]},
              magnification=sm.params.magnification, magnifications=getattr(sm.params, "magnifications", None),
              tensorboard=sm.params.tensorboard_dir if sm.config["training"]["tensorboard"] else None,
              out_model=sm.output.model, out_history=sm.output.history, out_predictions=sm.output.predictions,
              log=log, on_bad_slide=mode_of(sm.config))
