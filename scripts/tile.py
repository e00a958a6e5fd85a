"""Snakemake script of rule `tile`: the DeepZoom tile grid of one slide at every magnification."""

from slidesnake.exclusion import mode_of, sheet_path, write_excluded_tile_outputs
from slidesnake.io import setup_logging, write_json, write_table
from slidesnake.slide import one_line_errors
from slidesnake.tiling import tile_slide

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
p, slide_id = sm.params, sm.wildcards.slide
# on_bad_slide is read from the config, not a rule param: switching it must not rerun good slides.
mode = mode_of(sm.config)
# Under on_bad_slide: skip a slide file missing when the DAG was built is no input (common.smk,
# slide_path); its path is the sheet's, and open_slide reports it as not found.
path = sm.input.slide if sm.input.slide else sheet_path(
    [sm.config["samples"], (sm.config.get("predict") or {}).get("samples")], slide_id)

with one_line_errors(log, mode, "tile",
                     lambda rec: write_excluded_tile_outputs(sm.output.grid, sm.output.meta, slide_id, path, rec)):
    grid, meta = tile_slide(path, slide_id, magnifications=p.magnifications, tile_size=p.tile_size,
                            overlap=p.overlap, limit_bounds=p.limit_bounds, allow_upsample=p.allow_upsample,
                            mpp=p.mpp, default_mpp=p.default_mpp, default_objective=p.default_objective,
                            reader=p.reader, logger=log)
    write_table(grid, sm.output.grid)
    write_json(meta, sm.output.meta)
