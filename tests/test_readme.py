"""README.md is generated from nbs/index.ipynb, its result blocks come from figures/, and .ci/run calls README's test
command."""
import re
from pathlib import Path
from avar_net.reproduce import render_readme, readme_blocks, readme_block

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

def test_readme_is_generated_from_index():
    assert README == render_readme(ROOT / "nbs" / "index.ipynb"), \
        "README.md differs from nbs/index.ipynb: edit the notebook, then run avar_net.reproduce.sync_readme()"

def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    cmds = [l.split("#")[0].strip() for l in block.splitlines() if l.strip()]
    assert len(cmds) == 2, cmds
    assert "avar-net reproduce" in cmds[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci, f".ci/run must call README's test command: {cmds[1]!r}"

def test_result_blocks_match_figures():
    blocks = readme_blocks(README)
    assert blocks, "README has no result blocks"
    for name, body in blocks.items():
        md = ROOT / "figures" / f"{name}.md"
        assert md.exists(), f"README block {name!r} has no figures/{name}.md (run avar-net reproduce --profile demo)"
        assert body.strip() == readme_block(md.read_text()), f"README block {name!r} differs from figures/{name}.md"

def test_readme_figures_exist():
    for img in re.findall(r"\]\((figures/[^)]+\.png)\)", README):
        assert (ROOT / img).exists(), img
