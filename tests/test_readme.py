"""The README's walk-through runs as written, in order: every `bash` block after the first
(the install-and-test commands, which .ci/run runs), in one fresh folder. Reference syntax
with placeholders sits in `text` blocks and is not run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)


def test_every_relative_link_in_the_readme_and_docs_resolves():
    """`[text](path)` in README.md and docs/**/*.md names a file that exists, relative to the
    markdown file (anchors and web addresses aside; code blocks hold no links)."""
    root = README.parent
    broken = []
    for page in [README, *sorted((root / "docs").rglob("*.md"))]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(root)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_opens_with_the_two_commands():
    first = [line for line in bash_blocks(README.read_text())[0].splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(first) == 2 and "pip install" in first[0] and "pytest" in first[1]


@pytest.mark.slow
@pytest.mark.root
def test_the_walk_through_runs_in_order_as_written(tmp_path):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the walk-through's emulation step needs root and iproute2")
    blocks = bash_blocks(README.read_text())[1:]
    assert len(blocks) >= 5
    # the console scripts of the Python running the tests (a venv's bin may not be on PATH)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}"}
    for number, block in enumerate(blocks, start=1):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (f"walk-through block {number} failed:\n{block}\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        assert "Traceback" not in result.stderr, result.stderr
        if "tritonclient" in block:
            assert "from device -> edge -> cloud" in result.stdout
        if "wpk-emulate" in block:
            assert "end-to-end: measured" in result.stdout
