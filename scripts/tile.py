"""Snakemake script of rule `tile`: the DeepZoom tile grid of one slide at every magnification."""

from slidesnake.io import setup_logging, write_json, write_table
from slidesnake.slide import open_slide, resolve_resolution
from slidesnake.tiling import build_grid, slide_metadata

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
p, slide_id = sm.params, sm.wildcards.slide
path = sm.input.slide

slide = open_slide(path, slide_id)
res = resolve_resolution(slide.properties, slide_id, path, mpp_override=p.mpp,
                         default_mpp=p.default_mpp, default_objective=p.default_objective)
log.info("%s: mpp %.4f (%s), objective %gx (%s)", slide_id, res.mpp, res.mpp_source,
         res.objective_power, res.objective_source)
grid, levels = build_grid(slide, res, p.magnifications, p.tile_size, overlap=p.overlap,
                          limit_bounds=p.limit_bounds, allow_upsample=p.allow_upsample,
                          slide_id=slide_id, path=path)
for mag, info in levels.items():
    log.info("%sx: DeepZoom level %d, tile %d px -> %d px (%.1f um), %d tiles",
             mag, info["dz_level"], info["dz_tile_size"], p.tile_size, info["tile_um"], info["n_tiles"])
meta = {**slide_metadata(slide, slide_id, path, res), "tile_size": p.tile_size, "overlap": p.overlap,
        "limit_bounds": p.limit_bounds, "magnifications": levels}
write_table(grid, sm.output.grid)
write_json(meta, sm.output.meta)
