"""Cohort audit: one table and one HTML page a core facility reads before training.

Per slide (from its ``qc.json`` and the sample sheet): scanner / vendor, reader, MPP and where it
came from, objective, modality, tile yield, tissue area, out-of-focus and pen/background fractions,
mean Macenko stain vectors; and flags for what breaks a study (docs/design.md "Cohort audit"):

* ``mpp_outlier``: level-0 MPP more than :data:`MPP_TOLERANCE` from the cohort median;
* ``mpp_guessed``: MPP not from the slide or sheet (derived from the objective, or a config default);
* ``yield_outlier`` / ``stain_outlier``: kept tiles, or the haematoxylin / eosin (DAB) vector's
  angle, far from the slide's label group (robust z-score > :data:`ROBUST_Z`, with a floor);
* ``duplicate``: the same file content (``content_hash``) under two slide ids;
* ``patient_split``: a patient whose slides carry different labels;
* ``not_ok``: excluded, no tissue or no tiles.
"""

from __future__ import annotations

import hashlib
import html
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

MPP_TOLERANCE = 0.10          # relative difference to the cohort median MPP
ROBUST_Z = 3.5                # |x - median| / (1.4826 * MAD) above this is far from the group
YIELD_FLOOR = 0.25            # ... with the scale at least this share of the group median (tile counts)
ANGLE_FLOOR_DEG = 3.0         # ... and at least this many degrees (stain vectors)
MIN_GROUP = 4                 # smaller label groups are not judged (robust statistics need a few)
HASH_BYTES = 1 << 20          # content hash: size + the first and last MiB of every file
MIN_STAINED_PIXELS = 50       # fewer stained overview pixels: no stain vectors

FLAGS = ("not_ok", "mpp_outlier", "mpp_guessed", "yield_outlier", "stain_outlier", "duplicate", "patient_split")


def content_hash(path: str | os.PathLike) -> str:
    """A cheap content fingerprint: sha256 over the size and the first and last MiB of the file
    (of every file, sorted by name, for a folder of DICOM instances). Two copies of one slide match;
    reading whole multi-GB slides only to compare them would cost more than tiling them."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name if path.is_dir() else ''}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(HASH_BYTES))
            if size > 2 * HASH_BYTES:
                fh.seek(size - HASH_BYTES)
                h.update(fh.read(HASH_BYTES))
    return "q1:" + h.hexdigest()[:32]


def stain_vectors(rgb: np.ndarray) -> dict | None:
    """Macenko stain vectors (torchstain, numpy backend) of an RGB overview: the two optical-density
    unit vectors (haematoxylin first, then eosin or DAB) and their 99th-percentile concentrations;
    None when the image has too little stained tissue to fit."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    rgb = np.ascontiguousarray(rgb[..., :3]).reshape(-1, 3)
    od = -np.log((rgb.astype(np.float32) + 1) / 240)
    if int((od >= 0.15).all(axis=1).sum()) < MIN_STAINED_PIXELS:  # torchstain's own transparency cut
        return None
    try:
        norm = NumpyMacenkoNormalizer()
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            norm.fit(rgb)
    except Exception:  # noqa: BLE001 - torchstain fails (e.g. empty eigendecomposition) on blank images
        return None
    he = np.asarray(norm.HERef, np.float64)
    if not np.isfinite(he).all():
        return None
    return {"method": "macenko (torchstain)", "h": he[:, 0].round(4).tolist(), "e": he[:, 1].round(4).tolist(),
            "max_conc": np.asarray(norm.maxCRef, np.float64).round(4).tolist()}


def _finest(qc: dict) -> dict:
    mags = qc.get("magnifications") or {}
    if not mags:
        return {}
    return mags[max(mags, key=float)]


def audit_row(qc: dict) -> dict:
    m = _finest(qc)
    tissue = m.get("tissue") or 0
    sv = qc.get("stain_vectors") or {}
    return {
        "slide_id": qc["slide_id"], "status": qc.get("status"),
        "vendor": qc.get("vendor"), "scanner": qc.get("scanner"), "reader": qc.get("reader"),
        "modality": qc.get("modality"),
        "mpp": qc.get("mpp"), "mpp_source": qc.get("mpp_source"),
        "objective_power": qc.get("objective_power"), "objective_source": qc.get("objective_source"),
        "magnification": m.get("target"), "tiles": m.get("tiles"), "kept": m.get("kept"),
        "tissue_area_mm2": (qc.get("mask") or {}).get("tissue_area_mm2"),
        "blur_fraction": (m.get("blurred", 0) / tissue) if tissue else None,
        "pen_fraction": (m.get("artefact", 0) / tissue) if tissue else None,
        "stain_h": ",".join(f"{v:.3f}" for v in sv["h"]) if sv.get("h") else None,
        "stain_e": ",".join(f"{v:.3f}" for v in sv["e"]) if sv.get("e") else None,
        "content_hash": qc.get("content_hash"),
    }


def _robust_far(values: pd.Series, floor: float) -> pd.Series:
    med = values.median()
    scale = max(1.4826 * (values - med).abs().median(), floor)
    return (values - med).abs() / scale > ROBUST_Z


def _angle(vectors: list[np.ndarray], ref: np.ndarray) -> np.ndarray:
    ref = ref / np.linalg.norm(ref)
    return np.array([math.degrees(math.acos(float(np.clip(v @ ref / np.linalg.norm(v), -1, 1)))) for v in vectors])


def cohort_audit(records: list[dict], sheet: pd.DataFrame) -> pd.DataFrame:
    """The audit table: one row per slide of ``records`` (qc.json), joined with the sheet's
    ``patient_id``, ``label`` (and ``site`` when present), plus one boolean column per flag and a
    ``flags`` column naming them."""
    df = pd.DataFrame([audit_row(r) for r in records])
    if df.empty:
        return pd.DataFrame(columns=["slide_id", "flags"])
    cols = [c for c in ("slide_id", "patient_id", "label", "site") if c in sheet.columns]
    df = sheet[cols].drop_duplicates("slide_id").merge(df, on="slide_id", how="right")
    for f in FLAGS:
        df[f] = False
    df["not_ok"] = df["status"].ne("ok")
    mpp = pd.to_numeric(df["mpp"], errors="coerce")
    if mpp.notna().sum() >= MIN_GROUP:
        df["mpp_outlier"] = (mpp / mpp.median() - 1).abs() > MPP_TOLERANCE
    src = df["mpp_source"].fillna("")
    df["mpp_guessed"] = src.str.startswith("derived") | src.str.startswith("config")
    ok = ~df["not_ok"]
    if "label" in df:
        for _, g in df[ok].groupby("label"):
            if len(g) < MIN_GROUP:
                continue
            kept = pd.to_numeric(g["kept"], errors="coerce").astype(float)
            df.loc[g.index, "yield_outlier"] = _robust_far(kept, YIELD_FLOOR * max(kept.median(), 1.0))
            for col in ("stain_h", "stain_e"):
                has = g[col].notna()
                if has.sum() < MIN_GROUP:
                    continue
                vecs = [np.array([float(x) for x in s.split(",")]) for s in g.loc[has, col]]
                ref = np.median(np.stack(vecs), axis=0)
                angles = pd.Series(_angle(vecs, ref), index=g.index[has])
                far = _robust_far(angles, ANGLE_FLOOR_DEG)
                df.loc[far.index[far], "stain_outlier"] = True
    hashes = df["content_hash"].dropna()
    dup = hashes[hashes.duplicated(keep=False)]
    df.loc[dup.index, "duplicate"] = True
    if {"patient_id", "label"} <= set(df.columns):
        labels = sheet.groupby("patient_id")["label"].nunique()
        split = set(labels[labels > 1].index)
        df["patient_split"] = df["patient_id"].isin(split)
    df["flags"] = [",".join(f for f in FLAGS if row[f]) for _, row in df[list(FLAGS)].iterrows()]
    return df


_FLAG_TEXT = {
    "not_ok": "excluded or without tissue tiles: check the QC thumbnail and qc.json",
    "mpp_outlier": f"pixel size more than {MPP_TOLERANCE:.0%} from the cohort median: another scanner or "
                   "objective; check the sheet's mpp column",
    "mpp_guessed": "pixel size not in the file (derived from the objective or a config default): put the "
                   "measured mpp in the sheet",
    "yield_outlier": "kept tiles far from its label group's: check tissue detection and the slide",
    "stain_outlier": "stain colour far from its label group's: another lab / stain batch (a shortcut the model "
                     "can learn); consider stain normalisation or a site column",
    "duplicate": "the same file content as another slide id: remove one copy",
    "patient_split": "a patient whose slides carry different labels: fix the label or patient_id",
}


def audit_html(df: pd.DataFrame, title: str = "slidesnake cohort audit") -> str:
    """One self-contained HTML page: what to look at first (flags, with the slides), then the table."""
    e = html.escape
    n = len(df)
    flagged = df[df["flags"].astype(bool)] if n else df
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}tr.flag{background:#fff1e0}"
             "code{background:#f4f4f4}</style></head><body>",
             f"<h1>{e(title)}</h1><p>{n} slide(s); {len(flagged)} with at least one flag.</p>"]
    if n:
        parts.append("<h2>Look at these first</h2><ul>")
        for f in FLAGS:
            ids = df.loc[df[f], "slide_id"].tolist()
            if ids:
                parts.append(f"<li><b>{e(f)}</b> ({len(ids)}): {e(_FLAG_TEXT[f])}<br><code>"
                             f"{e(', '.join(map(str, ids)))}</code></li>")
        parts.append("</ul>")
        summary = []
        for col in ("vendor", "scanner", "reader", "mpp_source", "modality") + (("site",) if "site" in df else ()):
            counts = df[col].fillna("(none)").value_counts()
            summary.append(f"<li>{e(col)}: " + ", ".join(f"{e(str(k))} ({v})" for k, v in counts.items()) + "</li>")
        parts.append("<h2>Cohort</h2><ul>" + "".join(summary) + "</ul>")
    show = [c for c in df.columns if c not in FLAGS]
    parts.append("<h2>Slides</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in show) + "</tr>")
    for _, row in df.iterrows():
        cls = " class='flag'" if row.get("flags") else ""
        cells = []
        for c in show:
            v = row[c]
            if isinstance(v, float):
                v = "" if math.isnan(v) else f"{v:.4g}"
            cells.append(f"<td>{e(str(v if v is not None else ''))}</td>")
        parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    parts.append("</table><p>Flags and thresholds: docs/design.md, \"Cohort audit\".</p></body></html>")
    return "\n".join(parts)
