"""Attention heatmaps over slide thumbnails.

Tile scores are placed by their level-0 boxes (so the map sits exactly on the tissue whatever the
magnification), overlapping tiles are averaged, and scores are percentile-normalised within the
slide before they are blended over the thumbnail.

Also the per-tile exports of rule ``heatmap`` (scores table, QuPath detections, top/bottom tile
montage) and the localisation metric against annotated regions (``localisation_auc``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def oof_fold(splits: pd.DataFrame, slide_id: str) -> int | None:
    """The fold whose model did not train on ``slide_id`` (it is that fold's test slide); None for a
    slide no fold tested or every fold tested (a fixed held-out test set): the fold ensemble's."""
    rows = splits[(splits["slide_id"] == slide_id) & (splits["split"] == "test")]
    return int(rows["fold"].iloc[0]) if len(rows) == 1 else None


def normalise(scores: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Clip to the [low, high] percentiles of the slide and scale to [0, 1]."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    lo, hi = np.percentile(scores, [low, high])
    if hi <= lo:
        return np.full_like(scores, 0.5)
    return np.clip((scores - lo) / (hi - lo), 0.0, 1.0)


def relative_to_uniform(scores: np.ndarray, factor: float = 4.0) -> np.ndarray:
    """Attention as a colour value comparable across slides: ``log(a_i * N / sum(a))`` (the tile's
    weight relative to the uniform 1/N of its bag) over ``log(factor)``, mapped from [-1, 1] to
    [0, 1] and clipped: 0.5 = uniform, 1 = ``factor`` times uniform or more, 0 = 1/``factor`` or less."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    total = scores.sum()
    if not total > 0:
        return np.full_like(scores, 0.5)
    rel = np.maximum(scores, 0) * scores.size / total
    with np.errstate(divide="ignore"):
        x = np.log(rel) / np.log(float(factor))
    return np.clip((x + 1) / 2, 0.0, 1.0)


def scale_attention(scores: np.ndarray, scale: str = "slide", *, percentiles=(1.0, 99.0),
                    uniform_range: float = 4.0) -> np.ndarray:
    """Config ``heatmap.scale``: ``slide`` -> :func:`normalise` (the slide's percentiles), ``uniform``
    -> :func:`relative_to_uniform`."""
    if scale == "slide":
        return normalise(scores, *percentiles)
    if scale == "uniform":
        return relative_to_uniform(scores, uniform_range)
    raise ValueError(f"heatmap.scale must be 'slide' or 'uniform'; got {scale!r}")


def score_map(coords: np.ndarray, size: np.ndarray, scores: np.ndarray,
              slide_dims: tuple[int, int], map_dims: tuple[int, int]) -> np.ndarray:
    """A (H, W) map at ``map_dims`` (width, height) of the mean score of the tiles covering each pixel.

    Pixels covered by no tile are NaN. Tile boxes are level-0 ``coords`` (x, y) and ``size`` (w, h).
    """
    width, height = map_dims
    sx, sy = width / slide_dims[0], height / slide_dims[1]
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for (x, y), (w, h), s in zip(coords, size, scores):
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1 = max(x0 + 1, int(np.ceil((x + w) * sx)))
        y1 = max(y0 + 1, int(np.ceil((y + h) * sy)))
        total[y0:y1, x0:x1] += s
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def render(thumbnail, amap: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet", title: str = "",
           panel_title: str = "attention (percentile-normalised)"):
    """Figure with the plain thumbnail beside the attention overlay (titled ``panel_title``: say how
    the scores were scaled) and a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb = np.asarray(thumbnail)
    h, w = thumb.shape[:2]
    fig_w = 2 * 6.0 * w / max(w, h) + 1.2
    fig, axes = plt.subplots(1, 2, figsize=(fig_w, 6.0 * h / max(w, h) + 0.6), constrained_layout=True)
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    axes[1].imshow(thumb)
    im = axes[1].imshow(np.ma.masked_invalid(amap), cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                        interpolation="nearest")
    axes[1].set_title(panel_title)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02, label="attention")
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------- structured bags

def heatmap_bag(bag_type: str, store, *, magnification: float | None = None, magnifications=None,
                slide_id: str | None = None, case_stores=None, samples: pd.DataFrame | None = None):
    """The bag a model of ``bag_type`` reads for a slide's heatmap, and each attention layer's tiles.

    Returns ``(bag, boxes)`` where ``boxes`` maps a magnification to the level-0 ``(coords, size)``
    of the slide's tiles there: flat -- the slide at ``magnification``; multiscale -- the slide at
    every one of ``magnifications`` (``bag`` is ``None`` when a magnification has no tile, as training
    skips such slides); hierarchical -- the case bag of the slide's patient (all of its slides:
    ``case_stores``, with patient and stain from ``samples``), ``None`` when the case has no tile.
    """
    from slidesnake.bagkinds import bag_kind

    return bag_kind(bag_type).heatmap_bag(store, magnification=magnification, magnifications=magnifications,
                                          slide_id=slide_id, case_stores=case_stores, samples=samples)


def attention_layers(output, bag_type: str, magnification: float | None = None,
                     slide_id: str | None = None) -> dict[float, np.ndarray]:
    """The slide's attention per magnification from a model output: flat -- ``attention``;
    multiscale -- ``extras["attention"]`` (every magnification); hierarchical -- the slide's own
    patch attention ``extras["patch_attention"][slide_id]`` (empty when the slide had no tile)."""
    from slidesnake.bagkinds import bag_kind

    return bag_kind(bag_type).attention_layers(output, magnification, slide_id)


def instance_scores(model, output) -> np.ndarray | None:
    """Per-tile class score where the model has one: CLAM's instance classifier of the predicted class
    on the tile embeddings (``extras["h"]``), the probability of "in the class's positive cluster";
    None for models without instance classifiers."""
    import torch

    clfs = getattr(model, "instance_classifiers", None)
    h = (output.extras or {}).get("h") if hasattr(output, "extras") else None
    if clfs is None or h is None or h.ndim != 2:
        return None
    c = int(output.logits.detach().reshape(-1).argmax())
    with torch.no_grad():
        return torch.softmax(clfs[c](h).float(), dim=-1)[:, 1].cpu().numpy()


def case_weights(output, slide_id: str | None = None) -> list[tuple[str, float, bool]]:
    """Bars of a hierarchical output (:meth:`slidesnake.bagkinds.HierarchicalKind.bars`)."""
    from slidesnake.bagkinds import bag_kind

    return bag_kind("hierarchical").bars(output, slide_id)


def render_panels(thumbnail, maps: dict, *, alpha: float = 0.5, cmap: str = "jet", title: str = "",
                  bars: list[tuple[str, float, bool]] | None = None, colorbar_label: str = "attention"):
    """Thumbnail, one attention overlay per entry of ``maps`` (panel title -> (H, W) map in [0, 1]),
    and optionally a bar plot of ``(label, weight, highlight)`` (e.g. stain and slice weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb = np.asarray(thumbnail)
    h, w = thumb.shape[:2]
    n = 1 + len(maps) + (1 if bars else 0)
    panel_w = 5.0 * w / max(w, h)
    fig, axes = plt.subplots(1, n, figsize=(n * panel_w + 1.2, 5.0 * h / max(w, h) + 0.8),
                             constrained_layout=True, squeeze=False)
    axes = axes[0]
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    im = None
    for ax, (name, amap) in zip(axes[1:], maps.items()):
        ax.imshow(thumb)
        im = ax.imshow(np.ma.masked_invalid(amap), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
    for ax in axes[: 1 + len(maps)]:
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=list(axes[1: 1 + len(maps)]), fraction=0.046, pad=0.02, label=colorbar_label)
    if bars:
        ax = axes[-1]
        labels = [b[0] for b in bars][::-1]
        values = [b[1] for b in bars][::-1]
        colours = ["tab:red" if b[2] else ("tab:blue" if b[0].startswith("stain") else "tab:gray")
                   for b in bars][::-1]
        ax.barh(range(len(bars)), values, color=colours)
        ax.set_yticks(range(len(bars)), labels, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title("stain / slice weights")
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------- tile scores and exports

TILE_COLUMNS = ["slide_id", "tile_id", "magnification", "x", "y", "w", "h", "attention", "attention_norm"]


def tile_table(slide_id: str, store, raw: dict, norm: dict, instance: dict | None = None,
               grid: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per scored tile of the slide: ``TILE_COLUMNS`` (+ ``instance_score`` when given) and
    the tile's DeepZoom address (``dz_tile_size, dz_level, col, row``, for :class:`TileReader`).

    ``raw`` / ``norm`` / ``instance``: magnification -> ``(N,)`` scores in the store's row order. The
    address comes from the store's group attributes (schema 2), or from ``grid`` (``tiles.parquet``) when given.
    """
    from slidesnake.geometry import mag_label

    frames = []
    for m, att in raw.items():
        coords, size, addr_cr = store.coords(m), store.size(m), store.grid(m)
        ga = store.root[mag_label(m)].attrs
        df = pd.DataFrame({
            "slide_id": slide_id, "tile_id": store.tile_ids(m), "magnification": float(m),
            "x": coords[:, 0], "y": coords[:, 1], "w": size[:, 0], "h": size[:, 1],
            "attention": np.asarray(att, np.float64), "attention_norm": np.asarray(norm[m], np.float64)})
        if instance and m in instance:
            df["instance_score"] = np.asarray(instance[m], np.float64)
        df["dz_tile_size"] = int(ga.get("dz_tile_size", store.attrs.get("tile_size", 0)))
        df["dz_level"] = int(ga.get("dz_level", -1))
        df["col"], df["row"] = addr_cr[:, 0], addr_cr[:, 1]
        frames.append(df)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c.startswith("att") else object) for c in TILE_COLUMNS})
    out = pd.concat(frames, ignore_index=True)
    if grid is not None:
        addr = grid.set_index("tile_id").loc[out["tile_id"], ["dz_tile_size", "dz_level"]]
        out["dz_tile_size"], out["dz_level"] = addr["dz_tile_size"].to_numpy(), addr["dz_level"].to_numpy()
    return out


def _load_geojson(geojson) -> dict:
    import json

    if isinstance(geojson, dict):
        return geojson
    with open(geojson) as fh:
        return json.load(fh)


def _polygons(geojson) -> list[list[np.ndarray]]:
    """Every (Multi)Polygon of a FeatureCollection as a list of rings (exterior first, then holes)."""
    gj = _load_geojson(geojson)
    feats = gj.get("features", [gj]) if gj.get("type") == "FeatureCollection" else [gj]
    polys = []
    for f in feats:
        geom = f.get("geometry", f)
        if geom["type"] == "Polygon":
            polys.append([np.asarray(r, float) for r in geom["coordinates"]])
        elif geom["type"] == "MultiPolygon":
            polys.extend([np.asarray(r, float) for r in p] for p in geom["coordinates"])
    return polys


def points_in_regions(x: np.ndarray, y: np.ndarray, geojson) -> np.ndarray:
    """Whether each level-0 point lies inside a polygon of ``geojson`` (holes excluded)."""
    from matplotlib.path import Path

    pts = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    inside = np.zeros(len(pts), bool)
    for rings in _polygons(geojson):
        if not len(pts):
            break
        hit = Path(rings[0]).contains_points(pts)
        for hole in rings[1:]:
            hit &= ~Path(hole).contains_points(pts)
        inside |= hit
    return inside


def localisation_auc(tiles: pd.DataFrame, geojson, *, score: str = "attention",
                     magnification: float | None = None) -> float:
    """ROC AUC of the tiles' ``score`` against "tile centre inside a region of ``geojson``" (level-0
    polygons, e.g. the demo's planted tumour). With several magnifications, the finest (or
    ``magnification``) is used. NaN when every tile is inside or every tile outside."""
    from sklearn.metrics import roc_auc_score

    if len(tiles) and "magnification" in tiles:
        m = float(tiles["magnification"].max()) if magnification is None else float(magnification)
        tiles = tiles[np.isclose(tiles["magnification"].astype(float), m)]
    if not len(tiles):
        return float("nan")
    inside = points_in_regions(tiles["x"] + tiles["w"] / 2, tiles["y"] + tiles["h"] / 2, geojson)
    if inside.all() or not inside.any():
        return float("nan")
    return float(roc_auc_score(inside, tiles[score].to_numpy(float)))


def localisation_table(slides, *, positive=None) -> pd.DataFrame:
    """Per-slide localisation AUC and the cohort mean row (``slide_id == "mean"``).

    ``slides``: iterable of ``(slide_id, label, tiles DataFrame, geojson or None)``. Slides whose label
    is not in ``positive`` (when given), without annotation, or with tiles all on one side of the
    regions get no AUC (NaN, left out of the mean).
    """
    rows = []
    for slide_id, label, tiles, gj in slides:
        auc, n_in = float("nan"), 0
        if gj is not None and (positive is None or label in positive) and len(tiles):
            t = tiles[np.isclose(tiles["magnification"].astype(float), float(tiles["magnification"].max()))]
            n_in = int(points_in_regions(t["x"] + t["w"] / 2, t["y"] + t["h"] / 2, gj).sum())
            auc = localisation_auc(tiles, gj)
        rows.append({"slide_id": slide_id, "label": label, "n_tiles": len(tiles), "n_inside": n_in, "auc": auc})
    df = pd.DataFrame(rows, columns=["slide_id", "label", "n_tiles", "n_inside", "auc"])
    valid = df["auc"].dropna()
    mean = {"slide_id": "mean", "label": "", "n_tiles": int(df["n_tiles"].sum()),
            "n_inside": int(df["n_inside"].sum()), "auc": float(valid.mean()) if len(valid) else float("nan")}
    return pd.concat([df, pd.DataFrame([mean])], ignore_index=True)


def tiles_geojson(tiles: pd.DataFrame) -> dict:
    """Scored tiles as a GeoJSON FeatureCollection of QuPath detections (level-0 px tile boxes).

    ``measurements`` is a name -> value dict (read by QuPath 0.4+); ``properties.name`` carries the tile
    id and magnification.
    """
    meas = [c for c in ("attention", "attention_norm", "instance_score") if c in tiles]
    meas += [c for c in tiles.columns if str(c).startswith("patch_prob_")]
    feats = []
    for r in tiles.itertuples(index=False):
        x0, y0, x1, y1 = int(r.x), int(r.y), int(r.x + r.w), int(r.y + r.h)
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "detection",
                "name": f"tile {int(r.tile_id)} @ {float(r.magnification):g}x",
                "measurements": {k: float(getattr(r, k)) for k in meas},
            },
        })
    return {"type": "FeatureCollection", "features": feats}


def smooth(amap: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (``sigma`` in map pixels) of a map with NaN outside the tiles; NaN stays NaN."""
    if not sigma or sigma <= 0:
        return amap
    radius = max(0, min(int(np.ceil(3 * sigma)), (min(amap.shape) - 1) // 2))  # np.convolve 'same' keeps the length
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()

    def gaussian_filter(a, _sigma):  # separable, zero outside the map (normalised by ``den`` below)
        a = np.apply_along_axis(np.convolve, 0, a, kernel, mode="same")
        return np.apply_along_axis(np.convolve, 1, a, kernel, mode="same")

    valid = np.isfinite(amap)
    num = gaussian_filter(np.where(valid, amap, 0.0), sigma)
    den = gaussian_filter(valid.astype(np.float64), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, num / np.maximum(den, 1e-12), np.nan)


def render_top_tiles(reader, tiles: pd.DataFrame, k: int = 8, *, score: str = "attention", title: str = ""):
    """Montage of the ``k`` highest and ``k`` lowest scoring tiles (two rows), read at full resolution
    with ``reader`` (:class:`slidesnake.tiling.TileReader`), each captioned with its score and level-0
    coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = tiles.sort_values(score, ascending=False, kind="stable")
    k = max(1, min(int(k), len(order))) if len(order) else 1
    rows = [("top", order.head(k)), ("bottom", order.tail(k).iloc[::-1])] if len(order) else []
    fig, axes = plt.subplots(max(1, len(rows)), k, figsize=(2.2 * k, 2.6 * max(1, len(rows))),
                             squeeze=False, constrained_layout=True)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (name, sel) in enumerate(rows):
        for j, r in enumerate(sel.itertuples(index=False)):
            img = reader.read(int(r.dz_tile_size), int(r.dz_level), int(r.col), int(r.row))
            ax = axes[i, j]
            ax.imshow(img)
            ax.set_title(f"{name} {j + 1}: {getattr(r, score):.3g}\n({int(r.x)}, {int(r.y)}) @ {float(r.magnification):g}x",
                         fontsize=7)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no tiles", ha="center", va="center")
    if title:
        fig.suptitle(title)
    return fig


def write_heatmap_slide(path, tiles: pd.DataFrame, slide_dims: tuple[int, int], *, score: str = "attention_norm",
                        cmap: str = "jet", mpp: float = 0.5, objective: float = 20, alpha: float = 1.0) -> None:
    """The tile scores as a pyramidal tiled TIFF (Aperio SVS layout, :func:`slidesnake.svs.write_slide`)
    with the slide's level-0 dimensions, so OpenSlide (and QuPath / viewers) open it on the slide's
    coordinates: each tile box coloured by ``score`` through ``cmap``, off-tile pixels white. Scores of
    the finest magnification are drawn; overlapping tiles are averaged (:func:`score_map`)."""
    import matplotlib

    from slidesnake.svs import write_slide

    width, height = int(slide_dims[0]), int(slide_dims[1])
    if len(tiles):
        tiles = tiles[np.isclose(tiles["magnification"].astype(float), float(tiles["magnification"].max()))]
    cell = max(1.0, float(tiles[["w", "h"]].to_numpy().min()) / 4) if len(tiles) else float(max(width, height))
    dims = (max(1, int(np.ceil(width / cell))), max(1, int(np.ceil(height / cell))))
    amap = score_map(tiles[["x", "y"]].to_numpy(), tiles[["w", "h"]].to_numpy(), tiles[score].to_numpy(float),
                     (dims[0] * cell, dims[1] * cell), dims) if len(tiles) else np.full(dims[::-1], np.nan)
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(amap, nan=0.0))[..., :3]
    colour = (255 * (alpha * rgba + (1 - alpha))).round().astype(np.uint8)
    colour[~np.isfinite(amap)] = 255

    def render(x, y, w, h, ds):
        cx = np.clip(((x + (np.arange(w) + 0.5) * ds) / cell).astype(np.int64), 0, dims[0] - 1)
        cy = np.clip(((y + (np.arange(h) + 0.5) * ds) / cell).astype(np.int64), 0, dims[1] - 1)
        return colour[cy[:, None], cx[None, :]]

    write_slide(path, width, height, render, mpp=mpp, objective=objective)
