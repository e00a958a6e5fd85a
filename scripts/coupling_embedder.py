"""Snakemake script of rule coupling_embedder: one fold's embedder step of one coupling round."""

import pandas as pd
import torch

from slidesnake.coupling import CouplingSettings, embedder_step
from slidesnake.io import setup_logging

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
torch.set_num_threads(max(1, int(sm.threads)))
fold, rnd = int(sm.wildcards.fold), int(sm.wildcards.round)
splits = pd.read_csv(sm.input.splits, dtype={"slide_id": str, "patient_id": str, "label": str})
embedder_step(
    splits[splits["fold"] == fold], list(sm.input.stores), dict(sm.params.slide_paths), sm.input.model,
    list(sm.params.classes), backbone=sm.params.backbone,
    # round 1 starts from the configured weights, round r from round r-1's embedder
    weights=sm.input.embedder if rnd > 1 else sm.params.weights,
    magnification=sm.params.magnification, settings=CouplingSettings(**{**sm.params.coupling, "rounds": rnd}),
    out_weights=sm.output.weights, out_info=sm.output.info, out_labels=sm.output.labels,
    fold=fold, round=rnd, log=log)
