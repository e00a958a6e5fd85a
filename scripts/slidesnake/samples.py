"""Reading the sample sheet and the cross-row checks a JSON schema cannot express."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

REQUIRED = ["slide_id", "patient_id", "label", "path"]
_STR_COLUMNS = {c: str for c in REQUIRED + ["stain", "site"]}


class SampleSheetError(ValueError):
    """All problems of a sample sheet, one line each."""

    def __init__(self, sheet: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"sample sheet {sheet} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def _read_tsv(path: str | os.PathLike, dtype, header: str) -> pd.DataFrame:
    """``pd.read_csv`` of a sheet, with a one-line SampleSheetError naming the file for a file that is
    missing, empty (0 bytes) or not a table, and for a sheet without any slide row."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=dtype, comment="#", skip_blank_lines=True)
    except FileNotFoundError:
        raise SampleSheetError(str(path), ["file not found; fix config samples (relative paths are relative "
                                           "to the working directory)"]) from None
    except pd.errors.EmptyDataError:
        raise SampleSheetError(str(path), [f"file is empty ({os.path.getsize(path)} bytes); it needs a header "
                                           f"line naming {header} (tab-separated) and one row per slide"]) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SampleSheetError(str(path), [f"not a tab-separated table ({' '.join(str(e).split())}); "
                                           f"save it as TSV with the columns {header}"]) from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _require_rows(df: pd.DataFrame, path) -> None:
    if df.empty:
        raise SampleSheetError(str(path), ["no slide rows, only a header; add one row per slide "
                                           "(config/samples.tsv is an example)"])


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """The sheet as a DataFrame indexed by slide_id (string columns kept as strings)."""
    df = _read_tsv(path, _STR_COLUMNS, ", ".join(REQUIRED))
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SampleSheetError(str(path), [f"missing column(s) {', '.join(missing)}; "
                                           f"the header must name {', '.join(REQUIRED)}"])
    _require_rows(df, path)
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].str.strip()
    if "mpp" not in df.columns:
        df["mpp"] = float("nan")
    return df.set_index("slide_id", drop=False)


def schema_problems(df: pd.DataFrame, schema_path: str | os.PathLike) -> list[str]:
    """Every row's violations of the row schema (Snakemake's own validation stops at the first)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for i, record in enumerate(df.to_dict("records")):
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and pd.isna(v))}
        for err in sorted(validator.iter_errors(record), key=lambda e: list(e.path)):
            column = err.path[0] if err.path else None
            hint = schema["properties"].get(column, {}).get("description", "") if column else ""
            where = f"row {i + 1} (slide {record.get('slide_id', '?')!r})"
            what = f"column {column!r}: {err.message}" if column else err.message
            problems.append(f"{where}: {what}" + (f"; {hint}" if hint else ""))
    return problems


def missing_files(df: pd.DataFrame) -> dict[str, str]:
    """slide_id -> problem line, for every row whose file does not exist."""
    return {
        r.slide_id: f"row {i + 1} (slide {r.slide_id!r}): file {r.path} not found; fix the path "
                    "(relative paths are relative to the working directory)"
        for i, r in enumerate(df.itertuples(index=False)) if not Path(str(r.path)).exists()
    }


def check_sheet(df: pd.DataFrame, classes: list[str], sheet: str = "sample sheet",
                check_paths: bool = True, schema: str | os.PathLike | None = None) -> None:
    """Raise SampleSheetError listing every problem at once (rows numbered from 1 after the header).

    With ``schema`` (workflow/schemas/samples.schema.yaml) each row is also checked against it.
    """
    problems = schema_problems(df, schema) if schema else []
    for sid in df["slide_id"][df["slide_id"].duplicated()].unique():
        problems.append(f"slide_id {sid!r} appears more than once; slide ids must be unique")
    for i, r in enumerate(df.itertuples(index=False)):
        where = f"row {i + 1} (slide {r.slide_id!r})"
        if pd.isna(r.patient_id) or r.patient_id == "":
            problems.append(f"{where}: empty patient_id; give every slide its patient")
        if r.label not in classes:
            problems.append(f"{where}: label {r.label!r} is not one of config classes {classes}; "
                            "fix the label or add the class to config")
    if check_paths:
        problems.extend(missing_files(df).values())
    for path in df["path"][df["path"].duplicated()].unique():
        ids = ", ".join(df.loc[df["path"] == path, "slide_id"])
        problems.append(f"path {path} is listed for several slides ({ids}); list each file once")
    labels = df.groupby("patient_id")["label"].nunique()
    for pid in labels[labels > 1].index:
        problems.append(f"patient {pid!r} has slides with different labels "
                        f"({', '.join(sorted(df.loc[df['patient_id'] == pid, 'label'].unique()))}); "
                        "labels are per patient")
    if problems:
        raise SampleSheetError(sheet, problems)


# ------------------------------------------------------------------ predict sheet (new slides, no labels)

PREDICT_REQUIRED = ["slide_id", "path"]


def read_predict_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """The sheet of new slides to predict (config ``predict.samples``), indexed by slide_id.

    Columns ``slide_id, path`` and optionally ``patient_id`` (default: the slide id, a patient of
    one slide), ``stain`` and ``mpp``; a ``label`` column is not read (kept if present).
    """
    df = _read_tsv(path, {c: str for c in ("slide_id", "patient_id", "path", "stain", "label")},
                   ", ".join(PREDICT_REQUIRED))
    missing = [c for c in PREDICT_REQUIRED if c not in df.columns]
    if missing:
        raise SampleSheetError(str(path), [f"missing column(s) {', '.join(missing)}; the header of a predict "
                                           f"sheet must name {', '.join(PREDICT_REQUIRED)} (patient_id, stain, "
                                           "mpp optional)"])
    _require_rows(df, path)
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].str.strip()
    if "patient_id" not in df.columns:
        df["patient_id"] = df["slide_id"]
    df["patient_id"] = df["patient_id"].where(df["patient_id"].notna() & (df["patient_id"] != ""), df["slide_id"])
    if "mpp" not in df.columns:
        df["mpp"] = float("nan")
    return df.set_index("slide_id", drop=False)


def check_predict_sheet(df: pd.DataFrame, sheet: str = "predict sheet", *, schema: str | os.PathLike | None = None,
                        training: pd.DataFrame | None = None) -> None:
    """Raise SampleSheetError listing every problem of a predict sheet at once (rows from 1).

    Rows are checked against ``schema`` (workflow/schemas/predict_samples.schema.yaml); slide ids and
    paths must be unique; a slide id also in the ``training`` sheet must name the same file (its
    tiles, tissue and features are shared outputs).
    """
    problems = schema_problems(df, schema) if schema else []
    for sid in df["slide_id"][df["slide_id"].duplicated()].unique():
        problems.append(f"slide_id {sid!r} appears more than once; slide ids must be unique")
    for path in df["path"][df["path"].duplicated()].unique():
        ids = ", ".join(df.loc[df["path"] == path, "slide_id"])
        problems.append(f"path {path} is listed for several slides ({ids}); list each file once")
    if training is not None:
        known = dict(zip(training["slide_id"], training["path"]))
        for i, r in enumerate(df.itertuples(index=False)):
            if r.slide_id in known and os.path.normpath(str(known[r.slide_id])) != os.path.normpath(str(r.path)):
                problems.append(f"row {i + 1} (slide {r.slide_id!r}): the training sample sheet lists this slide id "
                                f"with another file ({known[r.slide_id]}); give the new slide another slide_id")
    if problems:
        raise SampleSheetError(sheet, problems)
