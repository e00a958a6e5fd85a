"""Bad slides under config ``on_bad_slide``: fail the job (default) or exclude the slide and go on.

One mechanism for every stage. A per-slide stage that meets a bad slide (a :class:`SlideError`:
missing, empty, unopenable or damaged file, no MPP, pixel data that cannot be decoded, non-finite
features; under ``skip`` also a slide without tissue) either

- ``fail``: logs the error's one line (slide id, path, problem, fix) and exits 1, as
  :func:`slidesnake.slide.one_line_errors` always did; or
- ``skip``: logs it as a warning and writes the stage's normal outputs *marked as excluded*: the
  record ``{"stage", "reason", "fix"}`` (:func:`record`) under the key ``"excluded"`` of
  ``slide.json`` / ``qc.json``, in the feature store's attributes (no magnification groups, no
  tiles), with empty tile tables and placeholder images. Every later stage finds the marker in its
  input and passes it on (:func:`excluded_of`) instead of reading the slide.

Training leaves excluded stores out (:class:`slidesnake.bags.ExcludedBag`, logged with the reason),
as it leaves out empty bags in both modes; heatmaps of excluded slides are placeholders saying why.
Rule ``excluded_table`` collects every slide left out of training into ``results/qc/excluded.tsv``
(:func:`excluded_table`).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import pandas as pd

from slidesnake.io import atomic_path, write_json, write_table
from slidesnake.errors import SlideError, describe, from_error, log_excluded, record  # noqa: F401

MODES = ("fail", "skip")
EXCLUDED_COLUMNS = ["slide_id", "patient_id", "path", "stage", "reason", "fix"]
_GRID_DTYPES = {"tile_id": "int64", "magnification": "float64", "dz_tile_size": "int32", "dz_level": "int32",
                "col": "int32", "row": "int32", "x": "int64", "y": "int64", "w": "int64", "h": "int64"}
_TISSUE_DTYPES = {"edge_score": "float32", "tissue_fraction": "float32", "background_fraction": "float32",
                  "ink_fraction": "float32", "focus_score": "float32", "tissue": "bool", "artefact": "bool",
                  "blurred": "bool", "keep": "bool"}
NO_TISSUE_FIX = ("check its QC thumbnail (results/qc/<slide>/thumbnail.png); if tissue was missed, "
                 "lower tissue.edge_threshold or tissue.otsu.min_coverage")


def mode_of(config: Mapping) -> str:
    """The ``on_bad_slide`` mode of a (validated) config; ``fail`` when absent."""
    mode = (config or {}).get("on_bad_slide", "fail")
    if mode not in MODES:
        raise ValueError(f"config on_bad_slide must be one of {MODES}; got {mode!r}")
    return mode


def sheet_path(sheets: str | os.PathLike | Sequence, slide_id: str) -> str:
    """A slide's ``path`` in the first of ``sheets`` (the sample sheet, then the predict sheet) that
    lists it (for a slide whose file is no job input: missing when the DAG was built). Read as
    :func:`slidesnake.samples.read_sheet` reads it, with pandas only."""
    for sheet in [sheets] if isinstance(sheets, (str, os.PathLike)) else [s for s in sheets if s]:
        df = pd.read_csv(sheet, sep="\t", dtype=str, comment="#", skip_blank_lines=True)
        df.columns = [c.strip() for c in df.columns]
        rows = df.loc[df["slide_id"].str.strip() == slide_id, "path"]
        if len(rows):
            return str(rows.iloc[0]).strip()
    raise KeyError(f"slide {slide_id!r} is in none of the sheets {sheets}")


def excluded_of(obj: Mapping | None) -> dict | None:
    """The exclusion marker of a slide.json / qc.json record or store attributes (None: not excluded)."""
    return (obj or {}).get("excluded") or None


# ------------------------------------------------------------------------------ stage outputs

def empty_grid(tissue: bool = False) -> pd.DataFrame:
    """A tile grid (``tissue``: tissue table) with the usual columns and no rows."""
    dtypes = {**_GRID_DTYPES, **(_TISSUE_DTYPES if tissue else {})}
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})


def placeholder_image(lines: Sequence[str], size: tuple[int, int] = (720, 160)):
    """A white PNG-able image with ``lines`` of text (excluded slides' thumbnails and heatmaps)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    y = 10
    for line in lines:
        # wrap long lines at about 100 characters
        for k in range(0, max(1, len(line)), 100):
            draw.text((10, y), line[k:k + 100], fill=(180, 0, 0) if y == 10 else (0, 0, 0))
            y += 16
    return image


def save_placeholder(path: str | os.PathLike, slide_id: str, rec: Mapping) -> None:
    image = placeholder_image([f"{slide_id}: {describe(rec)}", f"fix: {rec.get('fix') or '-'}"])
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_excluded_tile_outputs(grid_path, meta_path, slide_id: str, path, rec: Mapping) -> None:
    """Rule ``tile``: empty grid and a slide.json holding only the slide, its path and the marker."""
    write_table(empty_grid(), grid_path)
    write_json({"slide_id": slide_id, "path": str(path), "excluded": dict(rec), "warnings": []}, meta_path)


def write_excluded_tissue_outputs(outputs, slide_id: str, path, rec: Mapping) -> None:
    """Rule ``filter_tissue``: empty tissue table, placeholder thumbnail, empty GeoJSON, qc.json
    with status ``excluded`` and the marker (``outputs``: the rule's named outputs)."""
    write_table(empty_grid(tissue=True), outputs.tiles)
    save_placeholder(outputs.thumbnail, slide_id, rec)
    write_json({"type": "FeatureCollection", "features": []}, outputs.geojson)
    write_json({"slide_id": slide_id, "path": str(path), "status": "excluded", "excluded": dict(rec),
                "magnifications": {}}, outputs.qc)


def write_excluded_heatmap_outputs(outputs, slide_id: str, rec: Mapping, tile_columns: Sequence[str]) -> None:
    """Rule ``heatmap``: placeholder PNGs saying why, a tiles table with its header
    (``tile_columns``) only and an empty FeatureCollection (``outputs``: the rule's named outputs)."""
    for name in ("png", "top_tiles"):
        if hasattr(outputs, name):
            save_placeholder(getattr(outputs, name), slide_id, rec)
    write_table(pd.DataFrame(columns=list(tile_columns)), outputs.tiles)
    write_json({"type": "FeatureCollection", "features": []}, outputs.geojson)


# ------------------------------------------------------------------------------ cohort table

def excluded_table(samples: pd.DataFrame, stores: Mapping[str, object],
                   magnifications: Sequence[float]) -> pd.DataFrame:
    """Every slide left out of training: ``EXCLUDED_COLUMNS``, in sample-sheet order.

    ``stores``: slide_id -> its open :class:`~slidesnake.store.FeatureStore`. A slide is listed
    when its store is marked excluded (``on_bad_slide: skip``; the stage and reason of the marker),
    or when it has no tile at one of ``magnifications`` (the training magnification(s): an empty
    bag, left out of training in both modes).
    """
    rows = []
    for r in samples.itertuples(index=False):
        sid = str(r.slide_id)
        store = stores[sid]
        rec = store.excluded
        if rec is None:
            have = store.magnifications
            empty = [m for m in magnifications
                     if not any(math.isclose(float(m), h) for h in have)
                     or store.n_tiles(next(h for h in have if math.isclose(float(m), h))) == 0]
            if empty:
                at = ", ".join(f"{float(m):g}x" for m in empty)
                rec = record("filter_tissue", f"no tissue tile at {at} (empty bag, left out of training)",
                             NO_TISSUE_FIX.replace("<slide>", sid))
        if rec is not None:
            rows.append({"slide_id": sid, "patient_id": str(r.patient_id), "path": str(r.path),
                         "stage": rec["stage"], "reason": rec["reason"], "fix": rec.get("fix", "")})
    return pd.DataFrame(rows, columns=EXCLUDED_COLUMNS)
