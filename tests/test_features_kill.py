"""SIGKILL an `extract_dataset` subprocess at any moment, run it again: nothing is lost, nothing is done twice, no
partial or temporary file is read back, and the features equal those of an uninterrupted run."""
import os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from avar_net.core import DataError
from avar_net.features import FeatureConfig, FeatureStore, iter_status
from avar_net.extract import extract_dataset

TINY = dict(audio_backbone="random-tiny", video_backbone="random-tiny", precision="fp32")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    "Same thread count in this process and in the subprocesses (see test_features.py)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from avar_net.synth import generate_synthavar
    return Path(generate_synthavar(tmp_path_factory.mktemp("synth") / "avar", "tiny", seed=0,
                                   classes=["Explosion", "Normal"]))


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "features"
    extract_dataset(synth_root, out, FeatureConfig(**TINY), progress=False)
    return out


def _script(root, out, prelude: str = "") -> str:
    return textwrap.dedent(f"""
        import os, signal, time, torch
        torch.set_num_threads(1)
        import avar_net.extract as X, avar_net.features as F
        {prelude}
        X.extract_dataset({str(root)!r}, {str(out)!r}, F.FeatureConfig(**{TINY!r}), progress=False)
    """)


def _ok(out) -> set[str]:
    return {c for c, r in iter_status(out).items() if r.get("status") == "ok"}


def _resume_and_check(synth_root, reference, out, done_before: set[str]):
    n_all = len(FeatureStore(reference).records())
    s = extract_dataset(synth_root, out, FeatureConfig(**TINY), progress=False)
    assert set(s["skipped"]) == done_before                            # finished work is kept ...
    assert not set(s["computed"]) & done_before                        # ... and never redone
    assert len(s["computed"]) + len(s["skipped"]) == n_all and s["n_failed"] == 0 and s["complete"]
    left = [p.name for d in ("clips", "status") for p in (out / d).iterdir() if p.name.startswith(".")]
    assert left == []                                                  # no temporary leftovers
    st = FeatureStore(out)
    assert st.verify()["bad"] == [] and len(st) == n_all
    ref = FeatureStore(reference)
    for r in ref.records():
        a, b = ref.load(r["clip_id"]), st.load(r["clip_id"])
        for k in ("audio", "video", "step_start_s"):
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (r["clip_id"], k)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(synth_root, reference, tmp_path):
    "Kill -9 a real extraction after it has finished a few clips (polling the status folder)."
    out = tmp_path / "f"
    slow = ("_w = F.write_feature_file\n"
            "        def _slow(*a, **k):\n"
            "            time.sleep(0.25); return _w(*a, **k)\n"
            "        F.write_feature_file = _slow")
    p = subprocess.Popen([sys.executable, "-c", _script(synth_root, out, slow)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while len(_ok(out)) < 3:
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            assert time.monotonic() - t0 < 90, "extraction did not start"
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    done = _ok(out)
    assert 3 <= len(done) < 8 and not (out / "manifest.json").exists()
    _resume_and_check(synth_root, reference, out, done)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [4, 5])
def test_sigkill_inside_a_write(synth_root, reference, tmp_path, kill_at):
    """Kill at an exact point: at the 4th `os.replace` the 2nd clip's feature file exists only as a temporary; at the
    5th it is in place but its status record is not written yet. (Replace #1 is configs/<key>.json.)"""
    out = tmp_path / "f"
    hook = (f"_r, _n = os.replace, [0]\n"
            f"        def _replace(a, b):\n"
            f"            _n[0] += 1\n"
            f"            if _n[0] == {kill_at}: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"            return _r(a, b)\n"
            f"        os.replace = _replace")
    p = subprocess.run([sys.executable, "-c", _script(synth_root, out, hook)], capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    done = _ok(out)
    assert len(done) == 1
    tmp = [x.name for x in (out / "clips").iterdir() if x.name.endswith(".tmp")]
    files = {x.stem for x in (out / "clips").glob("*.safetensors")}
    if kill_at == 4: assert len(tmp) == 1 and files == done                 # a partial write, never renamed
    else: assert not tmp and len(files) == 2 and done < files               # a file without its status record
    st = FeatureStore(out)                               # no manifest yet: the view is rebuilt from the status records
    assert {r["clip_id"] for r in st.records()} == done  # only finished clips are served ...
    for orphan in files - done:                          # ... never a file without its status record
        with pytest.raises(DataError, match="no clip"): st.load(orphan)
    _resume_and_check(synth_root, reference, out, done)
