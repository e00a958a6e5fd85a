"""Configuration mistakes stop the workflow while it is parsed (slidesnake.config, common.smk) -- or,
for splits.k against the sheet, while the DAG is built, before any job -- in one line naming the key and
the fix -- not in a job after tiling and extraction. Dry runs on a copy of
the small reference run (tests/smallrun.py)."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import yaml

from slidesnake.config import (Config, ConfigError, check_config, check_splittable, registered_names,
                               schema_errors)
from test_workflow import snakemake


@pytest.fixture
def work(small_run, tmp_path):
    dst = tmp_path / "run"
    subprocess.run(["cp", "-a", str(small_run), str(dst)], check=True)
    return dst


def edit(work, section, **values):
    path = work / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    if section is None:
        cfg.update(values)
    else:
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))


def parse_error(work) -> str:
    """The dry run fails while parsing; its error output (must hold the config line)."""
    proc = snakemake(work, "-n", check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Job stats" not in proc.stdout  # nothing was planned
    return proc.stderr + proc.stdout


@pytest.mark.parametrize("section, values, line", [
    ("features", {"backbone": "resnet50_trunk"},
     "config features.backbone: unknown backbone 'resnet50_trunk'; use one of "),
    ("training", {"model": "abmill"}, "config training.model: unknown MIL model 'abmill'; use one of "),
    ("training", {"magnification": 10},
     "config training.magnification: 10x is not tiled (tiling.magnifications gives [20]); set it to one of [20]"),
    ("training", {"model": "cma_mil"}, "config training.magnifications: model cma_mil reads several magnifications"),
    ("splits", {"k": 4}, "config splits.k: 4 folds need 4 patients of every class, but normal, tumour have fewer "
                         "(patients per class: normal: 3, tumour: 3); set splits.k to at most 3"),
    ("tiling", {"tile_sise": 256}, "config tiling.tile_sise: unknown key; check its spelling"),
    ("training", {"lr": "fast"}, "config training.lr: 'fast' is not of type 'number'"),
])
def test_config_mistake_is_one_line_at_parse_time(work, section, values, line):
    edit(work, section, **values)
    text = parse_error(work)
    assert line in text, text[-3000:]
    # one line, not the schema (Snakemake's validate printed all 400 lines of it)
    assert "additionalProperties" not in text and "$schema" not in text
    assert len(text.splitlines()) < 40, text  # Snakemake's banner and a short trace around the line


def test_one_class_sheet_is_a_parse_error(work):
    sheet = pd.read_csv(work / "cohort" / "samples.tsv", sep="\t", dtype=str)
    sheet["label"] = "tumour"
    sheet.to_csv(work / "cohort" / "samples.tsv", sep="\t", index=False)
    text = parse_error(work)
    assert "config classes: the sample sheet has slides of one class only (tumour) of ['normal', 'tumour']" in text


def test_registries_read_without_torch_match_the_imported_ones():
    from slidesnake.backbones import list_backbones
    from slidesnake.models import get_model_class, list_models

    models = registered_names("model")
    assert sorted(models) == list_models()
    assert all(models[m] == get_model_class(m).bag_type for m in models)
    names = sorted(n + "<model_name>" if n.endswith(":") else n for n in registered_names("backbone"))
    assert names == list_backbones()


def test_splittable_counts_patients_not_slides():
    sheet = pd.DataFrame({"slide_id": list("abcdef"), "patient_id": ["p1", "p1", "p2", "p3", "p4", "p5"],
                          "label": ["x", "x", "x", "y", "y", "y"]})
    check_splittable(sheet, ["x", "y"], 2, 0)
    with pytest.raises(ConfigError, match=r"splits.k: 3 folds need 3 patients .* x has fewer .*at most 2"):
        check_splittable(sheet, ["x", "y"], 3, 0)
    with pytest.raises(ConfigError, match=r"held-out test set"):
        check_splittable(sheet, ["x", "y"], 2, 0.2)


def test_schema_errors_name_every_unknown_key():
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"a": {"type": "object", "additionalProperties": False,
                                   "properties": {"b": {"type": "integer"}}}}}
    assert schema_errors({"a": {"b": 1}}, schema) == []
    errs = schema_errors({"a": {"c": 1, "b": "x"}, "z": 0}, schema)
    assert any(e.startswith("config a.c: unknown key") for e in errs)
    assert any(e.startswith("config z: unknown key") for e in errs)
    assert any(e.startswith("config a.b: 'x' is not of type 'integer'") for e in errs)


def test_typed_sections_carry_the_schema_defaults(small_run):
    cfg_dict = yaml.safe_load((small_run / "config.yaml").read_text())
    from snakemake.utils import validate

    from conftest import REPO

    validate(cfg_dict, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    cfg = Config.from_dict(cfg_dict)
    check_config(cfg)
    assert cfg.training.optimizer == "adamw" and cfg.splits.k == 3 and cfg.tile_magnifications == [20.0]
    with pytest.raises(Exception):
        cfg.training.lr = 1.0  # frozen


@pytest.mark.parametrize("content, words", [
    ("", "file is empty (0 bytes); it needs a header line naming slide_id, patient_id, label, path"),
    ("slide_id\tpatient_id\tlabel\tpath\n", "no slide rows, only a header; add one row per slide"),
])
def test_empty_sheets_are_one_line_naming_the_file(tmp_path, content, words):
    from slidesnake.samples import SampleSheetError, read_predict_sheet, read_sheet

    path = tmp_path / "samples.tsv"
    path.write_text(content)
    for reader in (read_sheet, read_predict_sheet):
        with pytest.raises(SampleSheetError) as err:
            reader(path)
        assert str(path) in str(err.value)
        assert words.split(";")[0].split(" naming")[0] in str(err.value)
    with pytest.raises(SampleSheetError, match="file not found"):
        read_sheet(tmp_path / "nope.tsv")


def test_header_only_sheet_stops_the_parse(work):
    (work / "cohort" / "samples.tsv").write_text("slide_id\tpatient_id\tlabel\tpath\tstain\tmpp\n")
    text = parse_error(work)
    assert "cohort/samples.tsv has 1 problem(s)" in text and "no slide rows, only a header" in text
    assert "KeyError" not in text


def test_lock_left_by_a_killed_run_gets_a_one_line_hint(work):
    """What a SIGKILLed run leaves: Snakemake's lock files. The rerun stops with Snakemake's
    LockException, and slidesnake says to use --unlock; after --unlock the run goes on."""
    locks = work / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.output.lock").write_text("results/qc/slides.tsv\n")  # as Snakemake writes it
    (locks / "0.input.lock").write_text("")
    proc = snakemake(work, "--cores", "1", "--forcerun", "qc_table", "--until", "qc_table", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "lock" in text.lower()
    hint = [ln for ln in text.splitlines() if ln.startswith("slidesnake: this directory holds a Snakemake lock")]
    assert len(hint) == 1 and "snakemake --unlock" in hint[0]
    snakemake(work, "--unlock")
    proc = snakemake(work, "--cores", "1", "--forcerun", "qc_table", "--until", "qc_table")
    assert "holds a Snakemake lock" not in proc.stderr
