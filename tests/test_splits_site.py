"""Site-preserved folds (splits.site_preserved, sheet column `site`)."""

import pandas as pd
import pytest

from slidesnake.splits import SplitError, make_splits


def _sheet(n_sites=4, per_site=6):
    rows = []
    for s in range(n_sites):
        for p in range(per_site):
            pid = f"s{s}p{p}"
            rows += [{"slide_id": f"{pid}_{k}", "patient_id": pid, "label": "AB"[p % 2], "site": f"site{s}"}
                     for k in range(1 + p % 2)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("test_fraction", [0.0, 0.25])
def test_sites_stay_whole(test_fraction):
    sheet = _sheet(n_sites=8 if test_fraction else 4)
    k = 3
    splits = make_splits(sheet, k=k, seed=1, test_fraction=test_fraction, site_preserved=True)
    site = dict(zip(sheet["slide_id"], sheet["site"]))
    splits["site"] = splits["slide_id"].map(site)
    for _, fold in splits.groupby("fold"):
        assert (fold.groupby("site")["split"].nunique() == 1).all()  # no site in two partitions
    assert list(splits.columns[:5]) == ["fold", "slide_id", "patient_id", "label", "split"]
    # without the option the same sheet mixes sites across partitions
    plain = make_splits(sheet, k=k, seed=1, test_fraction=test_fraction)
    plain["site"] = plain["slide_id"].map(site)
    assert (plain.groupby(["fold", "site"])["split"].nunique() > 1).any()


def test_site_errors_are_one_line():
    with pytest.raises(SplitError, match="needs a 'site' column"):
        make_splits(_sheet().drop(columns="site"), k=3, site_preserved=True)
    bad = _sheet()
    bad.loc[1, "site"] = "site9"  # patient s0p1's two slides at two sites
    with pytest.raises(SplitError, match=r"more than one site"):
        make_splits(bad, k=3, site_preserved=True)
    with pytest.raises(SplitError, match=r"fewer than 5 sites.*site_preserved: false"):
        make_splits(_sheet(n_sites=4), k=5, site_preserved=True)
