import pytest

from slidesnake.samples import SampleSheetError, check_sheet, missing_files, read_sheet


def _sheet(tmp_path, rows, header="slide_id\tpatient_id\tlabel\tpath\tstain\tmpp"):
    p = tmp_path / "samples.tsv"
    p.write_text("# a comment line\n" + header + "\n" + "\n".join("\t".join(r) for r in rows) + "\n")
    return p


def test_reads_ids_as_strings_and_mpp_as_float(tmp_path):
    f = tmp_path / "a.svs"
    f.write_bytes(b"x")
    df = read_sheet(_sheet(tmp_path, [["001", "007", "tumour", str(f), "HE", ""],
                                      ["002", "007", "tumour", str(f) + "2", "HE", "0.25"]]))
    assert list(df["slide_id"]) == ["001", "002"] and df.loc["001", "patient_id"] == "007"
    assert df["mpp"].isna().iloc[0] and df.loc["002", "mpp"] == 0.25
    assert list(missing_files(df)) == ["002"]


def test_every_problem_reported_at_once_with_rows(tmp_path):
    rows = [["a", "p1", "tumour", "x.svs", "", ""],
            ["a", "p2", "normal", "y.svs", "", ""],
            ["b", "p1", "normal", "x.svs", "", ""],
            ["c", "p3", "benign", "z.svs", "", ""]]
    df = read_sheet(_sheet(tmp_path, rows))
    with pytest.raises(SampleSheetError) as err:
        check_sheet(df, ["normal", "tumour"], sheet="s.tsv")
    msg = str(err.value)
    assert "slide_id 'a' appears more than once" in msg
    assert "row 4 (slide 'c'): label 'benign'" in msg
    assert "path x.svs is listed for several slides" in msg
    assert "patient 'p1' has slides with different labels" in msg
    assert "file y.svs not found" in msg
    assert len(err.value.problems) == 7


def test_missing_required_column(tmp_path):
    with pytest.raises(SampleSheetError, match="missing column"):
        read_sheet(_sheet(tmp_path, [["a", "t", "p"]], header="slide_id\tlabel\tpath"))


def test_schema_problems_of_all_rows(tmp_path):
    from conftest import REPO

    rows = [["ok", "p1", "tumour", "a.svs", "", ""],
            ["../evil", "p2", "tumour", "b.svs", "", ""],
            ["c", "p3", "normal", "c.svs", "", "-1"],
            ["d/e", "p4", "normal", "d.svs", "", "abc"]]
    df = read_sheet(_sheet(tmp_path, rows))
    with pytest.raises(SampleSheetError) as err:
        check_sheet(df, ["normal", "tumour"], check_paths=False,
                    schema=REPO / "workflow" / "schemas" / "samples.schema.yaml")
    problems = err.value.problems
    assert any(p.startswith("row 2 (slide '../evil'): column 'slide_id'") and "no path separators" in p
               for p in problems)
    assert any(p.startswith("row 3 (slide 'c'): column 'mpp'") for p in problems)
    assert any(p.startswith("row 4 (slide 'd/e'): column 'slide_id'") for p in problems)
    assert any(p.startswith("row 4 (slide 'd/e'): column 'mpp'") for p in problems)
    assert not any(p.startswith("row 1 ") for p in problems)
