"""Snakemake script of rule `tile`: the DeepZoom tile grid of one slide at every magnification."""

from slidesnake.exclusion import mode_of, sheet_path, write_excluded_tile_outputs
from slidesnake.io import setup_logging, write_json, write_table
from slidesnake.slide import check_readable, one_line_errors, open_slide, resolve_resolution
from slidesnake.tiling import build_grid, slide_metadata

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
p, slide_id = sm.params, sm.wildcards.slide
# on_bad_slide is read from the config, not a rule param: switching it must not rerun good slides.
mode = mode_of(sm.config)
# Under on_bad_slide: skip a slide file missing when the DAG was built is no input (common.smk,
# slide_path); its path is the sheet's, and open_slide below reports it as not found.
path = sm.input.slide if sm.input.slide else sheet_path(
    [sm.config["samples"], (sm.config.get("predict") or {}).get("samples")], slide_id)


def exclude(rec):
    write_excluded_tile_outputs(sm.output.grid, sm.output.meta, slide_id, path, rec)


with one_line_errors(log, mode, "tile", exclude):
    slide = open_slide(path, slide_id)
    check_readable(slide, slide_id, path)
    res = resolve_resolution(slide.properties, slide_id, path, mpp_override=p.mpp,
                             default_mpp=p.default_mpp, default_objective=p.default_objective)
    log.info("%s: mpp %.4f x %.4f (%s), objective %gx (%s)", slide_id, res.mpp, res.mpp_y, res.mpp_source,
             res.objective_power, res.objective_source)
    warnings = []
    if res.anisotropy > 0.02:
        warnings.append(f"pixels are not square (mpp x {res.mpp:.4f}, y {res.mpp_y:.4f}): tiles are "
                        f"{100 * res.anisotropy:.0f}% off square in microns")
    if abs(10 / res.mpp - res.objective_power) > 0.25 * res.objective_power:
        warnings.append(f"objective {res.objective_power:g}x ({res.objective_source}) disagrees with mpp "
                        f"{res.mpp:.4f} (~{10 / res.mpp:.0f}x); magnifications follow the objective, "
                        "pixel-size targets ('0.5um') the mpp")
    grid, levels = build_grid(slide, res, p.magnifications, p.tile_size, overlap=p.overlap,
                              limit_bounds=p.limit_bounds, allow_upsample=p.allow_upsample,
                              slide_id=slide_id, path=path)
    for mag, info in levels.items():
        log.info("%sx (%s): DeepZoom level %d (downsample %d), tile %d px -> %d px (%.1f um), %d tiles%s",
                 mag, info["target"], info["dz_level"], info["dz_downsample"], info["dz_tile_size"],
                 p.tile_size, info["tile_um"], info["n_tiles"], " UPSAMPLED" if info["upsampled"] else "")
        if info["upsampled"]:
            warnings.append(f"{info['target']} is above the slide's resolution: tiles are upsampled "
                            f"{1 / info['downsample']:.2f}x")
    for w in warnings:
        log.warning("%s: %s", slide_id, w)
    meta = {**slide_metadata(slide, slide_id, path, res), "tile_size": p.tile_size, "overlap": p.overlap,
            "limit_bounds": p.limit_bounds, "magnifications": levels, "warnings": warnings}
    write_table(grid, sm.output.grid)
    write_json(meta, sm.output.meta)
