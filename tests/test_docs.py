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
