"""Optional stain normalisation of tiles before feature extraction (config
``features.stain_normalisation``, off by default).

Methods (torchstain, numpy backend): ``macenko`` (each tile's stains unmixed and recomposed with
the reference's stain vectors and maximal concentrations) and ``reinhard`` (each tile's LAB means
and standard deviations moved to the reference's). The reference is fitted on one reference
slide's tissue (its overview, tissue mask as in rule ``filter_tissue``), or, for ``macenko``, on
the cohort: the median of every brightfield slide's stain vectors from its ``qc.json`` (no extra
reads). Rule ``stain_reference`` writes it to ``features/stain_reference.json``; extraction applies
it in the tile dataset (:class:`TileNormaliser` as ``TileDataset``'s transform) and records it in
the feature store's attributes (``stain_normalisation``). A tile that cannot be normalised (too
little stain to unmix, e.g. glass) is used as it is, and counted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

METHODS = ("none", "macenko", "reinhard")


def _pixels(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., :3], dtype=np.uint8).reshape(-1, 3)


def fit_reference(method: str, rgb: np.ndarray, source: str) -> dict:
    """A reference (JSON-able dict) fitted on the RGB pixels ``rgb`` (any shape ending in 3)."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    px = _pixels(rgb)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if method == "macenko":
            n = NumpyMacenkoNormalizer()
            n.fit(px)
            ref = {"he": np.asarray(n.HERef).tolist(), "max_conc": np.asarray(n.maxCRef).tolist()}
        elif method == "reinhard":
            n = NumpyReinhardNormalizer()
            n.fit(px.reshape(-1, 1, 3))
            ref = {"lab_means": np.asarray(n.target_means).tolist(), "lab_stds": np.asarray(n.target_stds).tolist()}
        else:
            raise ValueError(f"features.stain_normalisation.method must be one of {METHODS}, got {method!r}")
    if not np.isfinite(np.concatenate([np.ravel(v) for v in ref.values()])).all():
        raise ValueError(f"the stain reference ({source}) has too little stained tissue to fit {method}")
    return {"method": method, "reference": source, **ref}


def cohort_reference(qc_records: list[dict]) -> dict:
    """Macenko reference of a cohort: the median stain vectors and concentrations of its slides'
    ``qc.json`` (``stain_vectors``, brightfield slides with tissue)."""
    rows = [r["stain_vectors"] for r in qc_records if r.get("stain_vectors")]
    if not rows:
        raise ValueError("no slide of the cohort has stain vectors (no brightfield slide with tissue); "
                         "set features.stain_normalisation.reference to a slide id")
    h = np.median([r["h"] for r in rows], axis=0)
    e = np.median([r["e"] for r in rows], axis=0)
    he = np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)], axis=1)
    max_conc = np.median([r["max_conc"] for r in rows], axis=0)
    return {"method": "macenko", "reference": f"cohort median of {len(rows)} slides", "he": he.tolist(),
            "max_conc": max_conc.tolist()}


def slide_tissue_pixels(path: str, slide_id: str, mpp: float, reader: str = "auto", um_per_px: float = 4.0,
                        max_pixels: int = 2_000_000) -> np.ndarray:
    """Tissue pixels of a slide's overview at ``um_per_px`` (brightfield mask), at most ``max_pixels``."""
    from slidesnake.slide import open_slide
    from slidesnake.tissue import OtsuParams, read_overview, tissue_mask

    slide = open_slide(path, slide_id, reader)
    overview = read_overview(slide, um_per_px / mpp, slide_id=slide_id, path=path)
    mask = tissue_mask(overview, mpp, OtsuParams(mask_mpp=um_per_px), "brightfield").mask
    px = overview.rgb[mask]
    if len(px) > max_pixels:
        px = px[np.random.default_rng(0).choice(len(px), max_pixels, replace=False)]
    return px


class TileNormaliser:
    """uint8 ``(H, W, 3)`` tile -> the tile in the reference's stain (picklable: DataLoader workers)."""

    def __init__(self, reference: dict):
        self.reference = dict(reference)
        self.method = reference["method"]
        self._norm = None
        self.failed = 0

    def __getstate__(self):
        return {**self.__dict__, "_norm": None}

    def _normaliser(self):
        if self._norm is None:
            from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

            if self.method == "macenko":
                self._norm = NumpyMacenkoNormalizer()
                self._norm.HERef = np.asarray(self.reference["he"], np.float64)
                self._norm.maxCRef = np.asarray(self.reference["max_conc"], np.float64)
            else:
                self._norm = NumpyReinhardNormalizer()
                self._norm.target_means = np.asarray(self.reference["lab_means"], np.float64)
                self._norm.target_stds = np.asarray(self.reference["lab_stds"], np.float64)
        return self._norm

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        norm = self._normaliser()
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                out = norm.normalize(tile, stains=False)[0] if self.method == "macenko" else norm.normalize(tile)
        except Exception:  # noqa: BLE001 - too little stain to unmix (glass, a pale tile): keep it as it is
            self.failed += 1
            return tile
        if out.shape != tile.shape or not np.isfinite(out).all():
            self.failed += 1
            return tile
        return out.astype(np.uint8, copy=False)

    def provenance(self) -> dict:
        """What goes into the feature store's attributes."""
        return {k: v for k, v in self.reference.items()}


def load_normaliser(path: str | Path | None) -> TileNormaliser | None:
    """The normaliser of a ``stain_reference.json`` (None for no file or method ``none``)."""
    if not path:
        return None
    ref = json.loads(Path(path).read_text())
    return None if ref.get("method", "none") == "none" else TileNormaliser(ref)
