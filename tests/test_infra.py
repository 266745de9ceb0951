"""infra/ agrees with itself and with the code: manifests parse, every file names the same
image, GPU groups ask for GPUs, entrypoints exist, no credentials are written down."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def load(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]
    assert docs, f"{name} is empty"
    return docs


def one(name: str) -> dict:
    (doc,) = load(name)
    return doc


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def dockerfile_image() -> str:
    """The tag the Dockerfile's build comment pushes."""
    text = (INFRA / "Dockerfile").read_text()
    return re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", text).group(1)


def test_all_yaml_parses():
    names = sorted(p.name for p in INFRA.glob("*.y*ml"))
    assert {"ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "prefect.yaml",
            "prefect-cluster.yaml"} <= set(names)
    for name in names:
        load(name)


def test_dockerfile_installs_the_gpu_extra_on_rays_image():
    text = (INFRA / "Dockerfile").read_text()
    run = " ".join(line for line in text.replace("\\\n", " ").splitlines() if line.startswith("RUN "))
    assert re.search(r"pip install [^&]*[\"']?\.\[gpu\][\"']?", run), run
    assert "faiss-cpu" not in run and "[cpu]" not in run  # both faiss wheels provide `import faiss`
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    import ray

    assert base.startswith(f"rayproject/ray:{ray.__version__}-"), f"base image {base} is not Ray {ray.__version__}"
    assert f"ray[default]=={ray.__version__}" in run
    for folder in ("flows", "pipeline", "kernels"):
        assert re.search(rf"^COPY .*\b{folder}/", text, re.M), f"Dockerfile does not copy {folder}/"


def test_every_file_names_the_same_image():
    image = dockerfile_image()
    launcher = one("ray-cluster.yaml")
    cluster = one("kuberay-raycluster.yaml")
    job = one("kuberay-rayjob.yaml")
    prefect = one("prefect-cluster.yaml")
    images = {"ray-cluster.yaml docker.image": launcher["docker"]["image"]}
    for c in containers(cluster["spec"]["headGroupSpec"]["template"]):
        images[f"RayCluster head {c['name']}"] = c["image"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        for c in containers(group["template"]):
            images[f"RayCluster {group['groupName']} {c['name']}"] = c["image"]
    for c in containers(job["spec"]["submitterPodTemplate"]):
        images[f"RayJob submitter {c['name']}"] = c["image"]
    for d in prefect["deployments"]:
        images[f"prefect-cluster.yaml {d['name']}"] = d["work_pool"]["job_variables"]["image"]
    assert {k: v for k, v in images.items() if v != image} == {}, f"images differ from the Dockerfile's {image}"


def test_ray_versions_agree():
    import ray

    assert one("kuberay-raycluster.yaml")["spec"]["rayVersion"] == ray.__version__


def test_launcher_has_a_cpu_head_and_gpu_workers():
    launcher = one("ray-cluster.yaml")
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_groups = [name for name, t in types.items() if name != launcher["head_node_type"]]
    assert gpu_groups and all(types[name]["resources"].get("GPU", 0) >= 1 for name in gpu_groups)
    assert any("--gpus" in opt for opt in launcher["docker"].get("worker_run_options", []))
    assert any("ray start --head" in cmd for cmd in launcher["head_start_ray_commands"])


def test_kuberay_gpu_group_requests_gpus():
    spec = one("kuberay-raycluster.yaml")["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "encoders" in groups  # the CPU group
    gpu = [g for name, g in groups.items() if "gpu" in name]
    assert gpu, "no GPU worker group"
    for group in gpu:
        for c in containers(group["template"]):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for c in containers(spec["headGroupSpec"]["template"]) + containers(groups["encoders"]["template"]):
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_rayjob_runs_on_the_raycluster_with_a_valid_vecpress_command():
    from vecpress.flows.cli import build_parser

    cluster = one("kuberay-raycluster.yaml")
    job = one("kuberay-rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == cluster["apiVersion"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "vecpress"
    args = build_parser().parse_args(argv[1:])  # SystemExit on anything the CLI would refuse
    assert args.command == "compress" and args.paths[-1].startswith("s3://")
    assert args.ray_address is None  # the job gets RAY_ADDRESS from Ray


def test_launcher_docs_submit_a_valid_vecpress_command():
    from vecpress.flows.cli import build_parser

    text = (INFRA / "ray-cluster.yaml").read_text().replace("\\\n#", " ")
    cmd = re.search(r"ray job submit -- +(vecpress [^\n]+)", text).group(1)
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert args.command == "compress"


@pytest.mark.parametrize("name", ["prefect.yaml", "prefect-cluster.yaml"])
def test_prefect_entrypoints_exist(name):
    import importlib.util

    from prefect import Flow

    for d in one(name)["deployments"]:
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file(), f"{name}: {d['entrypoint']} does not exist"
        spec = importlib.util.spec_from_file_location(f"_entry_{func}", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(getattr(module, func), Flow)


def test_prefect_cluster_deployment_targets_the_raycluster():
    from vecpress.flows.compress import compress_flow
    import inspect

    cluster = one("kuberay-raycluster.yaml")
    (d,) = one("prefect-cluster.yaml")["deployments"]
    env = d["work_pool"]["job_variables"]["env"]
    assert env["RAY_ADDRESS"].startswith(f"{cluster['metadata']['name']}-head-svc:")
    assert set(d["parameters"]) <= set(inspect.signature(compress_flow).parameters)
    steps = one("prefect-cluster.yaml")["pull"]
    workdir = steps[0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert re.search(rf"^WORKDIR {re.escape(workdir)}$", (INFRA / "Dockerfile").read_text(), re.M)


def test_no_credentials_written_in_infra():
    """Secrets come from Kubernetes Secrets or instance profiles: no key material in infra/."""
    for path in INFRA.iterdir():
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        for m in re.finditer(r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)\s*[:=]\s*(\S+)", text):
            assert m.group(2) in ("...",) or m.group(2).startswith(("{", "$")), f"{path.name}: {m.group(0)}"
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        for doc in load(name):
            for env in _find(doc, "env"):
                for var in env if isinstance(env, list) else []:
                    if var["name"] in ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
                        assert "valueFrom" in var and "value" not in var, f"{name}: {var['name']} written inline"


def _find(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find(v, key)
