"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line for line in readme.splitlines() if "pytest" in line and line.startswith("python3 -m venv"))
    assert test_cmd in ci.splitlines()


def test_readme_demo_command_uses_the_cli():
    readme = (ROOT / "README.md").read_text()
    assert any(line.startswith("python3 -m venv") and "vecpress demo" in line for line in readme.splitlines())


def test_infra_manifests_parse():
    import yaml

    doc = yaml.safe_load((ROOT / "infra" / "kuberay-raycluster.yaml").read_text())
    assert doc["kind"] == "RayCluster" and doc["spec"]["workerGroupSpecs"][0]["groupName"] == "encoders"


def test_readme_python_api_example_runs(tmp_path):
    """The README's Python API example, as written, in a fresh process (a local Ray, no Prefect)."""
    import os
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Python API", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README's Python API section has no python example"
    done = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "api-out" / "corpus.lance").is_dir()
