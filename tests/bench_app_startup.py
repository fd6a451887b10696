"""Start-up to first result of `avar-net app` on a 10 s SynthAVAR clip (run by hand, not by pytest):
launch the command -> health check answers -> open the page -> upload -> 'Top class' shown. Prints every repetition
and the medians. Trains (once) a tiny run on SynthAVAR with the given backbones into WORKDIR.

    python tests/bench_app_startup.py random-tiny 3 /tmp/app_bench   # tiny random backbones
    python tests/bench_app_startup.py random 3 /tmp/app_bench        # Wav2Vec2-base + MobileViT-S sizes, random weights
"""
import os, sys, time, socket, subprocess, urllib.request, statistics
from pathlib import Path
import torch; torch.set_num_threads(1)
spec, reps, T = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
run = T / f"run_{spec}"
if not (run / "MODEL_CARD.md").exists():
    from avar_net.synth import generate_synthavar
    from avar_net.features import FeatureConfig
    from avar_net.extract import extract_dataset
    from avar_net.train import train
    root = generate_synthavar(T / "data", "tiny", seed=0, classes=["Normal", "Explosion", "Police siren"],
                              clips_per_class=3, duration_s=[1.0, 1.0])
    extract_dataset(root, T / f"feats_{spec}", FeatureConfig(audio_backbone=spec, video_backbone=spec), progress=False)
    train(T / f"feats_{spec}", run, dict(num_stages=2, num_layers=2, num_f_maps=8), dict(epochs=2, batch_size=4),
          progress=False)
clip = T / "explosion_10s.mp4"
if not clip.exists():
    from avar_net.synth import write_mp4
    from avar_net.synthclip import render_clip
    f, a, fps, sr = render_clip("Explosion", seed=1, size=64, duration_s=10.0, fps=10); write_mp4(clip, f, fps, a, sr)
from playwright.sync_api import sync_playwright
out = []
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/lib/chromium/chromium-headless-shell", args=["--no-sandbox"])
    for r in range(reps):
        with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "avar_net.cli", "app", "--model", str(run), "--port", str(port),
                                 "--examples", str(T / "examples")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "2"})
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read().strip() == b"ok":
                    break
            except OSError: time.sleep(0.2)
        t_ready = time.monotonic() - t0
        ctx = b.new_context(); pg = ctx.new_page(); pg.set_default_timeout(600_000)
        pg.goto(f"http://127.0.0.1:{port}"); pg.locator("input[type=file]").set_input_files(str(clip))
        pg.get_by_text("Top class:").wait_for()
        t_res = time.monotonic() - t0
        cap = [l for l in pg.inner_text("body").splitlines() if "of video analysed" in l]
        ctx.close(); proc.terminate(); proc.wait()
        out.append({"ready_s": round(t_ready, 1), "first_result_s": round(t_res, 1), "caption": cap[0] if cap
                    else None})
        print(spec, out[-1], flush=True)
print(spec, "median ready", statistics.median(o["ready_s"] for o in out), "median first result",
      statistics.median(o["first_result_s"] for o in out))
