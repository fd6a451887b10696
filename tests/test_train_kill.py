"""SIGKILL a real training process at several moments (mid-epoch, during a checkpoint swap, during start-up), resume
each time, and get exactly the numbers and weights of an uninterrupted run."""
import json, os, random, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from avar_net.testing import write_synthetic_features
from avar_net.runtime import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
SCRIPT = textwrap.dedent(f"""
    import sys, torch
    torch.set_num_threads(1)
    from avar_net.train import TrainConfig, train
    train(sys.argv[1], sys.argv[2], dict(num_stages=2, num_layers=3, num_f_maps=16, dropout=0.2),
          TrainConfig(epochs={EPOCHS}, batch_size=4, lr=5e-3, seed=0), resume=True, progress=False)
""")


def start(script, feats, run):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(feats), str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def n_epochs(run):
    try: return len((Path(run) / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError: return 0


def kill(p):
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"process ended on its own ({p.returncode}) before the kill"


def wait_for(cond, p, timeout=300, poll=0.002):
    t0 = time.monotonic()
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"training exited early ({p.returncode}): {p.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout: raise AssertionError("timeout waiting for the training process")
        time.sleep(poll)


def check_consistent(run):
    "What a kill leaves behind: metrics.jsonl fully parseable; a last checkpoint (if any) loads."
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines() if (Path(run) / "metrics.jsonl").exists() else []
    hist = [json.loads(l) for l in lines]
    assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_gives_uninterrupted_numbers(tmp_path):
    feats = write_synthetic_features(tmp_path / "feats", n_per_class=8, seed=3)
    script = tmp_path / "train.py"; script.write_text(SCRIPT)
    ref = start(script, feats, tmp_path / "ref")          # the uninterrupted run, alongside
    run = tmp_path / "run"
    rng = random.Random(0)

    # 1. mid-epoch: after the first epoch is logged, at a random point of a later epoch
    p = start(script, feats, run)
    wait_for(lambda: n_epochs(run) >= 1, p)
    t1 = time.monotonic()
    wait_for(lambda: n_epochs(run) >= 2, p)
    epoch_s = time.monotonic() - t1
    time.sleep(rng.uniform(0.1, 0.8) * epoch_s)
    kill(p); check_consistent(run)
    done_1 = n_epochs(run)
    print(f"kill 1 after {done_1} epochs (epoch ~{epoch_s:.2f} s)")

    # 2. during the atomic checkpoint swap (last.tmp being written, or last moved to last.old)
    p = start(script, feats, run)
    ck = run / "checkpoints"
    swapping = lambda: ((ck / "last.tmp").exists() or (ck / "last.old").exists()
                        or n_epochs(run) >= min(EPOCHS - 1, done_1 + 2))
    wait_for(lambda: n_epochs(run) >= done_1 + 1 and swapping(), p, poll=0.0005)
    kill(p); check_consistent(run)
    print("kill 2 left:", sorted(x.name for x in ck.iterdir()), "epochs logged:", n_epochs(run))

    # 3. during start-up (imports, reading the run), before any new epoch
    p = start(script, feats, run)
    time.sleep(0.5)
    if p.poll() is None: kill(p)
    check_consistent(run)

    # 4. to the end
    p = start(script, feats, run)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]

    assert (run / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    for which in ("best", "last"):
        a = weights(run / f"checkpoints/{which}/model.safetensors")
        b = weights(tmp_path / f"ref/checkpoints/{which}/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    # optimizer state too (Adam moments), and nothing left over from the swaps
    _, sa, ta = load_checkpoint(run / "checkpoints/last")
    _, sb, tb = load_checkpoint(tmp_path / "ref/checkpoints/last")
    assert ta == tb
    for k, st in sa["optimizer"]["state"].items():
        for name, v in st.items(): assert torch.equal(v, sb["optimizer"]["state"][k][name]), (k, name)
    assert sorted(x.name for x in ck.iterdir()) == ["best", "last"]
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (run, tmp_path / "ref"))
    same = lambda r: {k: v for k, v in r.items() if k not in ("run_dir", "seconds")}
    assert same(ra) == same(rb)
