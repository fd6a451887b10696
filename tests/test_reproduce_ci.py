"""The `ci` reproduction end to end: every notebook of avar_net.reproduce.NOTEBOOKS runs with papermill, every artifact
named in the manifest exists with its checksum, every table says where its numbers come from, and rerunning a
notebook from scratch (fresh runs folder: everything retrained) gives byte-identical non-timing tables."""
import pytest
from avar_net.reproduce import reproduce, check_manifest, NOTEBOOKS, REPORTED

# the tables and figures the experiment notebooks promise (README shows the first three)
EXPECTED = {"16_pretrain": {"pretrain_curves", "pretrain_probe"},
            "20_fusion_ablation": {"fusion_ablation", "temporal_ablation", "fusion_pairs", "ablations"},
            "21_vaar": {"vaar_main", "vaar_confusion", "vaar_per_class_f1", "vaar_training_curves", "vaar_tsne"},
            "22_xd": {"xd_main", "xd_published", "xd_curves", "xd_timelines"},
            "23_robustness": {"robustness"},
            "24_efficiency": {"model_cost", "efficiency", "roofline"}}

@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    "One ci reproduction into temporary figures/data/runs folders, shared by the tests of this module."
    tmp = tmp_path_factory.mktemp("repro")
    mp = pytest.MonkeyPatch()
    mp.setenv("AVAR_DATA_DIR", str(tmp / "data")); mp.setenv("AVAR_RUNS_DIR", str(tmp / "runs"))
    mp.setenv("AVAR_WORKERS", "2")          # notebooks run one at a time here: let them use both cores
    # AVAR_IN_TEST (conftest) stays set: the module notebooks 01/02 take their ci-sized paths, as under nbdev_test
    try:
        m = reproduce("ci", figures_dir=tmp / "figs", runs_dir=tmp / "runs", log=lambda *a: None)
        yield tmp, m, mp
    finally: mp.undo()

@pytest.mark.slow
def test_every_artifact_produced_and_recorded(ci_run):
    tmp, m, _ = ci_run
    figs = tmp / "figs"
    assert check_manifest(figs) == []
    arts = m["artifacts"]
    assert {a["notebook"] for a in arts.values()} >= set(EXPECTED), "an experiment notebook produced nothing"
    for f, a in arts.items():
        assert (figs / f).stat().st_size > 0, f
        assert a["profile"] == "ci" and a["parameters"]["profile"] == "ci" and a["sha256"] and a["git_commit"]
    by_nb = {}
    for a in arts.values(): by_nb.setdefault(a["notebook"], set()).add(a["name"])
    for nb, names in EXPECTED.items():
        assert names <= by_nb.get(nb, set()), f"{nb} lacks {names - by_nb.get(nb, set())}"
    for nb in NOTEBOOKS: assert (tmp / "runs" / "ci" / f"{nb}.ipynb").exists(), f"no executed copy of {nb}"
    # every table says where its numbers come from, in the manifest and in its Markdown
    for f, a in arts.items():
        if a["kind"] != "table": continue
        assert a["source"] == REPORTED or a["source"].startswith("measured here"), (f, a["source"])
        if f.endswith(".md"): assert f"*Source: {a['source']}*" in (figs / f).read_text()
    assert arts["xd_published.csv"]["source"] == REPORTED
    src = arts["fusion_ablation.csv"]["source"]
    assert "profile ci" in src and "synthetic data" in src
    assert arts["efficiency.csv"]["timing"] and not arts["fusion_ablation.csv"]["timing"]

@pytest.mark.slow
def test_rerun_from_scratch_gives_identical_tables(ci_run, tmp_path):
    "The XD notebook again with a fresh runs folder (the three models are retrained): identical non-timing tables."
    tmp, m, mp = ci_run
    mp.setenv("AVAR_RUNS_DIR", str(tmp_path / "runs"))
    m2 = reproduce("ci", only="22_xd", figures_dir=tmp_path / "figs", runs_dir=tmp_path / "runs", log=lambda *a: None)
    assert any((tmp_path / "runs" / "ci" / "xd").iterdir()), "nothing was retrained"
    tables = [f for f, a in m2["artifacts"].items() if a["kind"] == "table" and not a["timing"]]
    assert {"xd_main.csv", "xd_main.md", "xd_published.csv"} <= set(tables)
    for f in tables:
        assert (tmp_path / "figs" / f).read_bytes() == (tmp / "figs" / f).read_bytes(), f"{f} differs between two runs"
