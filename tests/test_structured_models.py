"""Structured-bag models (cma_mil, hier_multistain), their bags, and digit benchmarks adapted to them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from slidesnake.bags import CaseBag, MultiscaleBag, case_rows, multiscale_bag
from slidesnake.demo import HEScene, cohort_specs
from slidesnake.models import create_model
from slidesnake.stages import train_job
from slidesnake.store import write_store
from digit_bags import CLASSES, MAGS, case_digit_bags, multiscale_digit_bags, nested_groups
from slidesnake.training import load_bags, load_checkpoint, predict_bag, predict_output, save_checkpoint, train_fold

# float() of attention / loss tensors that still carry their graph (backward is taken afterwards)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


# ------------------------------------------------------------------------------------ helpers

def random_multiscale(n_coarse=2, dim=8, seed=0, drop=0.3):
    rng = np.random.default_rng(seed)
    return multiscale_bag(nested_groups(rng.normal(size=(16 * n_coarse, dim)), n_coarse, rng, drop), MAGS)


def tensor_bag(bag):
    from slidesnake.bags import map_features, to_device
    return to_device(map_features(bag, lambda a: torch.as_tensor(np.asarray(a, np.float32))), "cpu")


def random_case(dim=8, seed=0, sizes=None):
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or {"HE": [7, 3, 12], "IHC": [5], "PAS": [4, 9]}
    return CaseBag({s: [torch.randn(n, dim, generator=g) for n in ns] for s, ns in sizes.items()},
                   {s: [f"c_{s}{k}" for k in range(len(ns))] for s, ns in sizes.items()}, "c")


# ------------------------------------------------------------------------------------ cma_mil

def test_multiscale_bag_parents_from_coords():
    bag = random_multiscale(n_coarse=2, drop=0.3, seed=1)
    assert bag.magnifications == list(MAGS)
    n = {m: len(bag.features[m]) for m in MAGS}
    assert n[5.0] == 2 and n[20.0] == 32 and 1 <= n[10.0] <= 8
    assert set(bag.parents) == {(10.0, 5.0), (20.0, 5.0), (20.0, 10.0)}
    assert (bag.parents[(20.0, 5.0)] == np.repeat([0, 1], 16)).all()  # every 20x tile lies in a kept 5x tile
    p = bag.parents[(20.0, 10.0)]
    assert (p == -1).sum() == 4 * (8 - n[10.0])  # children of dropped 10x tiles have no parent
    assert ((p >= -1) & (p < n[10.0])).all()


def test_cma_shapes_and_attention_normalised():
    torch.manual_seed(0)
    bag = tensor_bag(random_multiscale(n_coarse=2, dim=8, drop=0.3))
    for fusion in ("attention", "concat"):
        model = create_model("cma_mil", 8, 3, magnifications=MAGS, hidden=16, heads=2, fusion=fusion).eval()
        out = model(bag)
        assert out.logits.shape == (3,)
        att = {m: a.detach() for m, a in out.extras["attention"].items()}
        assert list(att) == list(MAGS)
        for m in MAGS:
            n = len(bag.features[m])
            assert att[m].shape == (n,) and float(att[m].sum()) == pytest.approx(1, abs=1e-5) and (att[m] >= 0).all()
            assert out.extras["cross_attention"][m].shape == (n, 3)
            assert torch.allclose(out.extras["cross_attention"][m].sum(1), torch.ones(n), atol=1e-5)
        assert torch.equal(out.attention.detach(), att[20.0])
        if fusion == "attention":
            assert out.extras["scale_weights"].shape == (3,)
            assert float(out.extras["scale_weights"].detach().sum()) == pytest.approx(1, abs=1e-5)
        else:
            assert "scale_weights" not in out.extras
        terms = model.loss(out, torch.tensor(2))
        assert set(terms) == {"ce", "instance", "total"}
        assert torch.isclose(terms["total"], 0.7 * terms["ce"] + 0.3 * terms["instance"])
        terms["total"].backward()


def test_cma_missing_parents_attend_only_to_what_exists():
    torch.manual_seed(0)
    bag = tensor_bag(random_multiscale(n_coarse=2, dim=8, drop=0.5, seed=3))
    model = create_model("cma_mil", 8, 2, magnifications=MAGS, hidden=16, heads=4).eval()
    cross = model(bag).extras["cross_attention"]
    orphan = bag.parents[(20.0, 10.0)] < 0
    assert orphan.any() and (~orphan).any()
    # 20x tiles (token order 5x, 10x, 20x) without a 10x parent put no weight on that token
    assert (cross[20.0][orphan, 1] == 0).all() and (cross[20.0][~orphan, 1] > 0).all()
    # every 10x tile has children; 5x tiles see their 10x and 20x children
    assert (cross[10.0] > 0).all() and (cross[5.0] > 0).all()
    # a scale whose tiles all lost their parents still works: only self and the 5x tile remain
    bag.parents[(20.0, 10.0)] = torch.full_like(bag.parents[(20.0, 10.0)], -1)
    out = model(bag)
    assert (out.extras["cross_attention"][20.0][:, 1] == 0).all()
    assert (out.extras["cross_attention"][10.0][:, 2] == 0).all()  # no 10x tile has a 20x child now
    assert torch.isfinite(out.logits).all()


def test_cma_checks_and_small_bags():
    bag = tensor_bag(random_multiscale(n_coarse=1, dim=8, drop=0.0))
    model = create_model("cma_mil", 8, 2, magnifications=(5, 20), hidden=8, heads=2)
    with pytest.raises(ValueError, match="magnifications"):
        model(bag)
    with pytest.raises(TypeError, match="MultiscaleBag"):
        model(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="two distinct"):
        create_model("cma_mil", 8, 2, magnifications=[20])
    model = create_model("cma_mil", 8, 2, magnifications=MAGS, hidden=8, heads=2, k_sample=50).eval()
    out = model(bag)
    assert float(model.instance_loss(out, torch.tensor(1))) > 0  # k = min(50, 16 // 2)
    one = MultiscaleBag({5.0: bag.features[5.0], 10.0: bag.features[10.0][:1], 20.0: bag.features[20.0][:1]},
                        {k: v[:1] for k, v in bag.parents.items()})  # one tile at 10x and 20x
    assert float(model.instance_loss(model(one), torch.tensor(1))) == 0


# ------------------------------------------------------------------------------ hier_multistain

def test_hier_shapes_and_attention_normalised_at_every_level():
    torch.manual_seed(0)
    bag = random_case()
    model = create_model("hier_multistain", 8, 2, hidden=16, attn_dim=8).eval()
    out = model(bag)
    ex = out.extras
    assert out.logits.shape == (2,)
    assert ex["stains"] == ["HE", "IHC", "PAS"]
    assert ex["stain_attention"].shape == (3,) and float(ex["stain_attention"].sum()) == pytest.approx(1, abs=1e-5)
    for stain, arrays in bag.stains.items():
        assert ex["slice_attention"][stain].shape == (len(arrays),)
        assert float(ex["slice_attention"][stain].sum()) == pytest.approx(1, abs=1e-5)
        assert ex["slice_ids"][stain] == bag.slide_ids[stain]
        for sid, x in zip(bag.slide_ids[stain], arrays):
            assert ex["patch_attention"][sid].shape == (len(x),) and ex["patch_index"][sid] is None
            assert float(ex["patch_attention"][sid].sum()) == pytest.approx(1, abs=1e-5)
    n = sum(len(x) for arrays in bag.stains.values() for x in arrays)
    assert out.attention.shape == (n,) and float(out.attention.sum()) == pytest.approx(1, abs=1e-5)
    assert float(sum(ex["slide_weight"].values())) == pytest.approx(1, abs=1e-5)
    # the flattened attention is stain x slice x patch weight, in bag order
    first = bag.slide_ids["HE"][0]
    expected = ex["slide_weight"][first] * ex["patch_attention"][first]
    assert torch.allclose(out.attention[:7], expected)
    # a case with a missing stain and one slice per stain
    out = model(random_case(sizes={"IHC": [1]}))
    assert out.attention.shape == (1,) and float(out.attention) == pytest.approx(1)


def test_hier_regularisers_zero_unless_weighted():
    torch.manual_seed(0)
    bag = random_case()
    model = create_model("hier_multistain", 8, 2, hidden=16, attn_dim=8).eval()
    out = model(bag)
    terms = model.loss(out, torch.tensor(1))
    levels = ("patch", "slice", "stain")
    names = [f"{r}_{lv}" for lv in levels for r in ("entropy", "l1", "l2")]
    assert set(terms) == {"ce", "total", *names}
    assert all(float(terms[k]) == 0 for k in names)
    assert torch.isclose(terms["total"], terms["ce"])
    weighted = create_model("hier_multistain", 8, 2, hidden=16, attn_dim=8, entropy_weight=0.1,
                            l1_weight={"patch": 0.01, "slice": 0.02, "stain": 0.03}, l2_weight=0.5)
    weighted.load_state_dict(model.state_dict())
    weighted.eval()
    out = weighted(bag)
    terms = weighted.loss(out, torch.tensor(1))
    assert all(float(terms[k]) > 0 for k in names)
    assert torch.isclose(terms["total"], sum(v for k, v in terms.items() if k != "total"))
    terms["total"].backward()
    only_patch = create_model("hier_multistain", 8, 2, hidden=16, attn_dim=8, entropy_weight={"patch": 1.0})
    terms = only_patch.loss(only_patch.eval()(bag), torch.tensor(0))
    assert float(terms["entropy_patch"]) > 0 and float(terms["entropy_slice"]) == 0
    with pytest.raises(ValueError, match="unknown level"):
        create_model("hier_multistain", 8, 2, l1_weight={"tile": 1.0})


def test_hier_caps_in_train_mode_only():
    bag = random_case(sizes={"HE": [30, 4, 12, 9, 20, 7, 11], "IHC": [25]})
    model = create_model("hier_multistain", 8, 2, hidden=16, attn_dim=8, per_slice_cap=10,
                         max_slices_per_stain=3, seed=1)
    model.train()
    for _ in range(3):
        ex = model(bag).extras
        assert len(ex["slice_attention"]["HE"]) == 3 and len(ex["slice_attention"]["IHC"]) == 1
        for sid, a in ex["patch_attention"].items():
            stain, k = sid.split("_")[1][:-1], int(sid[-1])
            n = len(bag.stains[stain][k])
            assert len(a) == min(n, 10)
            rows = ex["patch_index"][sid]
            assert (rows is None) == (n <= 10)
            if rows is not None:
                assert len(set(rows.tolist())) == 10 and int(rows.max()) < n
    a = create_model("hier_multistain", 8, 2, hidden=16, per_slice_cap=10, seed=5).train()
    b = create_model("hier_multistain", 8, 2, hidden=16, per_slice_cap=10, seed=5).train()
    assert torch.equal(a(bag).extras["patch_index"]["c_HE0"], b(bag).extras["patch_index"]["c_HE0"])
    ex = model.eval()(bag).extras
    assert len(ex["slice_attention"]["HE"]) == 7
    assert all(len(ex["patch_attention"][sid]) == len(x)
               for s, arrays in bag.stains.items() for sid, x in zip(bag.slide_ids[s], arrays))


# --------------------------------------------------------------------------------- benchmarks

def _bag_auc(res, n_test):
    test = res.predictions[res.predictions["split"] == "test"]
    assert len(test) == n_test
    return roc_auc_score(test["label"] == "nine", test["prob_nine"]), test


@pytest.mark.slow
def test_multiscale_digits_benchmark(record_property):
    torch.set_num_threads(1)
    bags, inst, splits = multiscale_digit_bags()
    res = train_fold(bags, splits, CLASSES, "cma_mil", {"hidden": 32, "heads": 2, "dropout": 0.1},
                     lr=1e-3, epochs=15, patience=4, min_epochs=4, seed=0, device="cpu")
    assert res.model_kwargs["magnifications"] == list(MAGS)  # read off the bags, saved with the kwargs
    bag_auc, test = _bag_auc(res, 100)
    ckpt = {"feature_mean": res.feature_mean, "feature_std": res.feature_std}
    att, is_nine = [], []
    for sid in test.loc[test["label"] == "nine", "slide_id"]:
        _, a = predict_bag(res.model, ckpt, bags[sid])
        att.append(a)
        is_nine.append(inst[sid])
    inst_auc = roc_auc_score(np.concatenate(is_nine), np.concatenate(att))
    for k, v in dict(bag_auc=bag_auc, instance_auc=inst_auc, epochs_run=len(res.history)).items():
        record_property(k, v)
    print(f"multiscale digit bags (cma_mil): bag AUC {bag_auc:.4f}, finest-scale instance AUC {inst_auc:.4f}, "
          f"best epoch {res.best_epoch}/{len(res.history)}")
    assert bag_auc >= 0.95
    assert inst_auc >= 0.85
    assert len(res.history) <= 15  # the work is bounded in epochs (time: scripts/bench/bench_digit_bags.py)


@pytest.mark.slow
def test_case_digits_benchmark(record_property):
    torch.set_num_threads(1)
    bags, inst, splits = case_digit_bags()
    res = train_fold(bags, splits, CLASSES, "hier_multistain",
                     {"hidden": 32, "attn_dim": 16, "dropout": 0.1},
                     lr=1e-3, epochs=15, patience=4, min_epochs=4, seed=0, device="cpu")
    bag_auc, test = _bag_auc(res, 100)
    assert (test["slide_id"] == test["patient_id"]).all()  # one row per case
    assert list(res.predictions["slide_id"]) == list(case_rows(splits)["slide_id"])
    ckpt = {"feature_mean": res.feature_mean, "feature_std": res.feature_std}
    att, is_nine = [], []
    for case in test.loc[test["label"] == "nine", "slide_id"]:
        _, out = predict_output(res.model, ckpt, bags[case])
        for sid, w in out.extras["slide_weight"].items():
            att.append((w * out.extras["patch_attention"][sid]).numpy())
            is_nine.append(inst[sid])
    inst_auc = roc_auc_score(np.concatenate(is_nine), np.concatenate(att))
    for k, v in dict(bag_auc=bag_auc, instance_auc=inst_auc, epochs_run=len(res.history)).items():
        record_property(k, v)
    print(f"case digit bags (hier_multistain): case AUC {bag_auc:.4f}, effective patch-attention AUC {inst_auc:.4f}, "
          f"best epoch {res.best_epoch}/{len(res.history)}")
    assert bag_auc >= 0.95
    assert inst_auc >= 0.85
    assert len(res.history) <= 15  # the work is bounded in epochs (time: scripts/bench/bench_digit_bags.py)


# ------------------------------------------------------------------------- stores, script, checkpoint

def write_stores(tmp_path, n_patients=8, dim=6, seed=0):
    """Zarr stores at 5/10/20x of tiny nested grids (level-0 tile sides 896/448/224) and a sample
    sheet of 2 stains x 1-2 slides per patient; positive patients have shifted 20x features."""
    rng = np.random.default_rng(seed)
    rows, stores = [], []
    for p in range(n_patients):
        label = ["normal", "tumour"][p % 2]
        for stain in ("HE", "IHC"):
            for k in range(int(rng.integers(1, 3))):
                sid = f"P{p}_{stain}{k + 1}"
                fine = rng.normal(size=(32, dim)) + (1.5 if label == "tumour" else 0.0)
                fake = nested_groups(fine, 2, rng, drop=0.25)
                groups = {m: {"features": g["features"], "coords": g["coords"] * 224, "size": g["size"] * 224,
                              "grid": g["coords"], "tile_id": np.arange(len(g["coords"]))}
                          for m, g in fake.groups.items()}
                path = tmp_path / "features" / f"{sid}.zarr"
                write_store(path, {"slide_id": sid}, groups, feature_dtype="float32")
                stores.append(str(path))
                rows.append(dict(slide_id=sid, patient_id=f"P{p}", label=label, path=f"{sid}.svs", stain=stain))
    sheet = pd.DataFrame(rows)
    sheet.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    return stores, sheet


def test_load_bags_builds_each_bag_type(tmp_path):
    stores, sheet = write_stores(tmp_path, n_patients=3)
    ids = sheet["slide_id"].tolist()
    flat = load_bags(stores, 20, ids)
    assert flat[ids[0]].shape == (32, 6)
    ms = load_bags(stores, None, ids, bag_type="multiscale", magnifications=[20, 5, 10])
    bag = ms[ids[0]]
    assert isinstance(bag, MultiscaleBag) and bag.magnifications == list(MAGS)
    np.testing.assert_array_equal(bag.features[20.0], flat[ids[0]])
    assert (bag.parents[(20.0, 5.0)] == np.repeat([0, 1], 16)).all()
    assert (bag.parents[(20.0, 10.0)] == -1).sum() == 4 * (8 - len(bag.features[10.0]))
    with pytest.raises(ValueError, match="at least two"):
        load_bags(stores, None, ids, bag_type="multiscale", magnifications=[20])
    with pytest.raises(ValueError, match="no features at 40x"):
        load_bags(stores, None, ids, bag_type="multiscale", magnifications=[20, 40])
    cases = load_bags(stores, 20, ids, bag_type="hierarchical", samples=sheet)
    assert sorted(cases) == ["P0", "P1", "P2"]
    for pid, case in cases.items():
        mine = sheet[sheet["patient_id"] == pid]
        assert list(case.stains) == ["HE", "IHC"]
        for stain in ("HE", "IHC"):
            assert case.slide_ids[stain] == sorted(mine.loc[mine["stain"] == stain, "slide_id"])
            for sid, x in zip(case.slide_ids[stain], case.stains[stain]):
                np.testing.assert_array_equal(x, flat[sid])
    with pytest.raises(ValueError, match="sample sheet"):
        load_bags(stores, 20, ids, bag_type="hierarchical")


def test_wrong_bag_type_is_a_clear_error(tmp_path):
    stores, sheet = write_stores(tmp_path, n_patients=4)
    ids = sheet["slide_id"].tolist()
    flat = load_bags(stores, 20, ids)
    splits = sheet.assign(fold=0, split=np.where(sheet["patient_id"].isin(["P0", "P1"]), "train", "val"))
    with pytest.raises(TypeError, match="reads 'multiscale' bags but got a 'flat' bag"):
        train_fold(flat, splits, ["normal", "tumour"], "cma_mil", epochs=1, device="cpu")


@pytest.mark.parametrize("model,kwargs", [("cma_mil", {"hidden": 8, "heads": 2}),
                                          ("hier_multistain", {"hidden": 8, "attn_dim": 4, "per_slice_cap": 10})])
def test_train_script_and_checkpoint(tmp_path, model, kwargs):
    stores, sheet = write_stores(tmp_path, n_patients=8)
    split = {f"P{p}": s for p, s in zip(range(8), ["train"] * 4 + ["val"] * 2 + ["test"] * 2)}
    splits = sheet.loc[:, ["slide_id", "patient_id", "label"]].assign(fold=0, split=sheet["patient_id"].map(split))
    splits_csv = tmp_path / "splits.csv"
    splits.to_csv(splits_csv, index=False)
    out = tmp_path / "models" / model / "fold_0"
    train_job(features=stores, splits=splits_csv, samples=tmp_path / "samples.tsv", fold=0,
              classes=["normal", "tumour"], model=model, model_kwargs=kwargs, magnification=20,
              magnifications=[5, 10, 20], training={"epochs": 2, "lr": 1e-3, "device": "cpu"},
              out_model=out / "model.pt", out_history=out / "history.csv", out_predictions=out / "predictions.csv")
    pred = pd.read_csv(out / "predictions.csv", dtype=str)
    units = sheet["slide_id"] if model == "cma_mil" else sheet["patient_id"].drop_duplicates()
    assert sorted(pred["slide_id"]) == sorted(units)
    m, ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["bag_type"] == m.bag_type and ckpt["magnification"] == 20.0
    if model == "cma_mil":
        assert ckpt["model_kwargs"]["magnifications"] == list(MAGS) and ckpt["magnifications"] == list(MAGS)
        bag = load_bags(stores, None, [sheet["slide_id"][0]], bag_type="multiscale", magnifications=MAGS)
        unit = sheet["slide_id"][0]
    else:
        bag = load_bags(stores, 20, sheet["slide_id"], bag_type="hierarchical", samples=sheet)
        unit = "P0"
    probs, att = predict_bag(m, ckpt, bag[unit])
    row = pred.set_index("slide_id").loc[unit, ["prob_normal", "prob_tumour"]].to_numpy(float)
    np.testing.assert_allclose(probs, row, rtol=1e-5)
    assert float(att.sum()) == pytest.approx(1, abs=1e-5)
    # saving again (as train_fold's result would be) keeps the inferred kwargs
    save_checkpoint(tmp_path / "again.pt", _result_like(m, ckpt))
    m2, _ = load_checkpoint(tmp_path / "again.pt")
    np.testing.assert_allclose(predict_bag(m2, ckpt, bag[unit])[0], probs, rtol=1e-6)


def _result_like(model, ckpt):
    return SimpleNamespace(model=model, model_name=ckpt["model_name"], model_kwargs=ckpt["model_kwargs"],
                           in_dim=ckpt["in_dim"], classes=ckpt["classes"], feature_mean=ckpt["feature_mean"],
                           feature_std=ckpt["feature_std"], fold=ckpt["fold"], best_epoch=ckpt["best_epoch"],
                           class_weights=ckpt["class_weights"])


# ------------------------------------------------------------------------------------ demo cohort

def test_multistain_demo_cohort_specs():
    specs = cohort_specs(6, size=1000, seed=3, stains=["HE", "IHC"], slices_per_stain=(1, 3))
    df = pd.DataFrame([s.__dict__ for s in specs])
    assert df["slide_id"].is_unique and set(df["stain"]) == {"HE", "IHC"}
    assert (df.groupby("patient_id")["label"].nunique() == 1).all()
    per = df.groupby(["patient_id", "stain"]).size()
    assert len(per) == 12 and per.between(1, 3).all()
    assert ((df["n_regions"] > 0) == (df["label"] == "tumour")).all()
    assert (df["slide_id"] == df["patient_id"] + "_" + df["stain"]
            + df.groupby(["patient_id", "stain"]).cumcount().add(1).astype(str)).all()
    default = cohort_specs(4, seed=1)
    assert {s.stain for s in default} == {"HE"} and all(s.slide_id.endswith(("_S1", "_S2")) for s in default)
    with pytest.raises(ValueError, match="stains"):
        cohort_specs(4, stains=["HE", "Trichrome"])


def test_ihc_scene_colours_tumour_brown():
    he = HEScene(900, 900, seed=4, n_regions=1, tumour_fraction=0.3)
    ihc = HEScene(900, 900, seed=4, n_regions=1, tumour_fraction=0.3, stain="IHC")
    assert [r.tolist() for r in he.regions] == [r.tolist() for r in ihc.regions]  # same layout
    tumour = he.tumour_mask(0, 0, 900, 900)
    stroma = he.tissue_mask(0, 0, 900, 900) & ~tumour
    a, b = he.render(0, 0, 900, 900).astype(float), ihc.render(0, 0, 900, 900).astype(float)
    # DAB: red above blue in the tumour; H&E tumour is purple (blue above red)
    assert a[tumour][:, 0].mean() < a[tumour][:, 2].mean()
    assert b[tumour][:, 0].mean() > b[tumour][:, 2].mean() + 8
    # no eosin: the IHC background is far less pink (red over green) than H&E stroma
    pink = lambda img: img[stroma][:, 0].mean() - img[stroma][:, 1].mean()  # noqa: E731
    assert pink(b) < pink(a) - 10
    with pytest.raises(ValueError, match="unknown stain"):
        HEScene(100, 100, stain="PAS")


def test_heatmap_helpers_for_structured_outputs(tmp_path):
    from slidesnake.heatmap import attention_layers, case_weights, heatmap_bag, render_panels
    from slidesnake.store import open_store

    stores, sheet = write_stores(tmp_path, n_patients=2)
    sid = sheet["slide_id"][0]
    store = open_store(stores[0])
    bag, boxes = heatmap_bag("multiscale", store, magnifications=[5, 10, 20])
    model = create_model("cma_mil", 6, 2, magnifications=MAGS, hidden=8, heads=2)
    ckpt = {"feature_mean": np.zeros(6, np.float32), "feature_std": np.ones(6, np.float32)}
    _, out = predict_output(model, ckpt, bag)
    layers = attention_layers(out, "multiscale")
    assert list(layers) == list(MAGS) == list(boxes)
    assert all(len(layers[m]) == len(boxes[m][0]) for m in MAGS)

    case_stores = [p for p in stores if Path(p).name.startswith("P0_")]
    bag, boxes = heatmap_bag("hierarchical", store, magnification=20.0, slide_id=sid, case_stores=case_stores,
                             samples=sheet)
    model = create_model("hier_multistain", 6, 2, hidden=8, attn_dim=4)
    _, out = predict_output(model, ckpt, bag)
    layers = attention_layers(out, "hierarchical", 20.0, sid)
    assert len(layers[20.0]) == len(boxes[20.0][0]) == 32
    bars = case_weights(out, sid)
    assert [b[0] for b in bars if b[0].startswith("stain")] == ["stain HE", "stain IHC"]
    assert sum(b[2] for b in bars) == 1 and sum(b[1] for b in bars if b[0].startswith("stain")) == pytest.approx(1)
    thumb = np.full((40, 60, 3), 230, np.uint8)
    fig = render_panels(thumb, {"a": np.random.rand(40, 60), "b": np.full((40, 60), np.nan)}, bars=bars, title="t")
    assert len(fig.axes) == 5  # slide, two maps, bars, colour bar
