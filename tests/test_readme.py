"""The README's runnable example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_runnable_readme_blocks(tmp_path, monkeypatch):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "# runnable as-is" in b]
    assert blocks, "the README has no block marked '# runnable as-is'"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})
