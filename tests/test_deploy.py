"""The deployment files agree with Ray, with the jobs' own configs and with each other.

ray_cluster.yaml (Ray's cluster launcher), infra/docker/Dockerfile (+ .dockerignore), infra/k8s/*.yaml
(KubeRay) and infra/serve_config.yaml, checked without a cluster, Docker or network: the launcher
config against the schema and checks `ray up` applies before it contacts AWS; one image and one Ray
version everywhere; node and pod sizes against what the wan2.1-1.3b jobs ask for; every `key=value`
of a RayJob entrypoint and of the README's cluster commands loaded by the job's own config loader
(a misspelled field fails here, not on a cluster); the RayService's Serve config equal to
infra/serve_config.yaml; the pod templates of the RayJobs and the RayService equal to raycluster.yaml's.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from astra.config import ConfigError
from astra.encode.config import load_encode_config
from astra.rollout.config import serve_config_from_args
from astra.train.config import load_train_config
from astra.train.config import resolve_paths as resolve_train_paths

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
MANIFESTS = ("raycluster.yaml", "rayjob-encode.yaml", "rayjob-train.yaml", "rayservice.yaml")
LOADERS = {"jobs/encode.py": load_encode_config, "jobs/train.py": load_train_config}
# (vCPUs, GPUs) of the AWS instance types a node type may name (AWS's published sizes)
INSTANCES = {
    "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0), "m6i.8xlarge": (32, 0),
    "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1), "g6.4xlarge": (16, 1), "g6.8xlarge": (32, 1),
    "g6e.xlarge": (4, 1), "g6e.2xlarge": (8, 1), "g6e.4xlarge": (16, 1),
    "p4d.24xlarge": (96, 8), "p4de.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}  # fmt: skip


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_config() -> dict:
    return load(ROOT / "ray_cluster.yaml")


def manifest(name: str) -> dict:
    return load(K8S / name)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "infra" / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"
    ]


def dockerfile_tag() -> str:
    """The tag the Dockerfile's header says to build (and push)."""
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    (build,) = re.findall(r"docker build -f infra/docker/Dockerfile -t (\S+) \.", text)
    assert f"docker push {build}" in text
    return build


def workdir() -> str:
    return [args for op, args in dockerfile() if op == "WORKDIR"][-1]


def copied() -> list[str]:
    """The sources of the Dockerfile's COPY instructions (flags and destinations left out)."""
    sources = []
    for op, args in dockerfile():
        if op == "COPY":
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    return sources


def containers(spec: dict) -> list[dict]:
    """Every container of a RayCluster spec (head and worker groups)."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster, a RayJob or a RayService."""
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return doc["spec"] if key is None else doc["spec"][key]


def group(spec: dict, name: str) -> dict:
    (found,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == name]
    return found


def gpus(g: dict) -> int:
    (container,) = g["template"]["spec"]["containers"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def job_command(tokens: list[str]) -> tuple[str, list[str]]:
    """(repo-relative script, its key=value overrides) of `python <...>/jobs/X.py k=v ...`."""
    (i,) = [i for i, t in enumerate(tokens) if t.endswith(tuple(LOADERS))]
    script, overrides = tokens[i], tokens[i + 1 :]
    assert tokens[i - 1] == "python" and all("=" in o for o in overrides), tokens
    if script.startswith("/"):  # the image's checkout, from a folder the Dockerfile copies
        assert script.startswith(workdir() + "/"), script
        script = script.removeprefix(workdir() + "/")
        assert script.split("/")[0] + "/" in copied(), script
    assert (ROOT / script).is_file(), script
    return script, overrides


def readme_commands() -> list[str]:
    """The shell commands of the README's "Running on a cluster" section, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Running on a cluster\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = re.sub(r"\\\n\s*", " ", "".join(blocks)).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


# ----------------------------------------------------------------------------- the cluster launcher


def test_cluster_launcher_config_passes_rays_own_checks():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = cluster_config()
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before it calls AWS
    # the same checks refuse a misspelled node-type field and a GPU count that is no integer
    bad = copy.deepcopy(config)
    bad["available_node_types"]["train"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["serve"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_cluster_node_types_fit_what_the_jobs_ask_for():
    config = cluster_config()
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert set(types) == {"head", "encode", "train", "serve"} and config["head_node_type"] == "head"
    for name, node in types.items():
        cpus, gpu_count = INSTANCES[node["node_config"]["InstanceType"]]
        assert node["resources"].get("GPU", 0) == gpu_count or name == "head", name
        assert node["resources"]["CPU"] <= cpus, name
        assert node.get("min_workers", 0) <= node.get("max_workers", 0), name
    assert types["head"]["resources"] == {"CPU": 0}  # nothing scheduled on the head
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]

    train = load_train_config(None, ["preset=wan2.1-1.3b"]).parallel
    assert train.use_gpu and types["train"]["resources"]["GPU"] == train.workers == 8  # one node per run
    encode = load_encode_config(None, ["preset=wan2.1-1.3b", "manifest=m.jsonl"]).compute
    assert types["encode"]["resources"]["GPU"] >= encode.vae_num_gpus > 0
    replicas = serve_args().replicas
    assert types["serve"]["resources"]["GPU"] >= replicas.num_gpus > 0
    assert types["serve"]["max_workers"] * types["serve"]["resources"]["GPU"] >= (
        replicas.max_replicas * replicas.num_gpus
    )
    # GPUs for the workers only: the head is a CPU instance
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert not any("--gpus" in o for o in config["docker"]["run_options"])


def serve_args():
    (app,) = load(ROOT / "infra" / "serve_config.yaml")["applications"]
    return serve_config_from_args(app["args"])


# ----------------------------------------------------------------------------- one image, one Ray


def test_one_image_everywhere_tagged_with_the_project_version():
    image = dockerfile_tag()
    assert image.rsplit(":", 1)[1] == pyproject()["project"]["version"]
    docker = cluster_config()["docker"]
    assert docker["image"] == image
    assert docker.get("head_image", image) == docker.get("worker_image", image) == image
    for node in cluster_config()["available_node_types"].values():
        assert node.get("docker", {}).get("worker_image", image) == image
    for name in MANIFESTS:
        images = {c["image"] for c in containers(cluster_spec(manifest(name)))}
        assert images == {image}, name


def test_one_ray_version_the_project_accepts():
    (base,) = [args for op, args in dockerfile() if op == "FROM"]
    found = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu\d+", base)
    assert found, base
    version, python = found[1], Version(f"{found[2]}.{found[3]}")
    for name in MANIFESTS:
        assert cluster_spec(manifest(name))["rayVersion"] == version, name
    ray_req = [Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("ray[")]
    assert ray_req[0].specifier.contains(version)
    assert python in Requirement(f"python{pyproject()['project']['requires-python']}").specifier


# ----------------------------------------------------------------------------- the Dockerfile


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a repo-relative path: the last matching pattern wins, a folder's match covers
    what is inside it, `**` spans folders, other wildcards stay within one."""
    parts, ignored = path.split("/"), False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_matcher():
    patterns = ["runs", "**/__pycache__", "**/*.safetensors", "!keep.safetensors"]
    assert dockerignored("runs/x/y.txt", patterns) and not dockerignored("platform/runs.py", patterns)
    assert dockerignored("platform/astra/__pycache__/a.pyc", patterns)
    assert dockerignored("models/demo/vae/w.safetensors", patterns)
    assert not dockerignored("keep.safetensors", patterns)


def test_dockerfile_builds_the_project_without_weights_as_a_user():
    steps = dockerfile()
    ops = [op for op, _ in steps]
    assert ops[0] in ("FROM", "ARG") and "FROM" in ops
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert not any(op == "ADD" for op in ops)  # COPY only: no remote URLs, no auto-extracted archives
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    for must in (".venv", "runs", "models", "**/*.safetensors"):
        assert must in patterns, must
    for source in copied():  # in the repo, and every tracked file of it inside the build context
        tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True)
        assert tracked.stdout.split(), source
        for rel in tracked.stdout.split():
            assert not dockerignored(rel, patterns), rel
    assert {"pyproject.toml", "README.md", "platform/", "jobs/", "serving/"} <= set(copied())
    # the project is installed after its sources are copied (pyproject.toml names README.md)
    install = [
        i for i, (op, args) in enumerate(steps) if op == "RUN" and re.search(r"pip install \.(\s|$)", args)
    ]
    assert install and install[0] > max(
        i for i, (op, a) in enumerate(steps) if "platform/" in a and op == "COPY"
    )
    # torch: the Makefile's tested pin, inside the project's range, from a CUDA index
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    pin = args["TORCH_SPEC"].strip('"')
    make = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)[1].strip()
    assert pin == make
    torch_req = [Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("torch")]
    (exact,) = Requirement(pin).specifier
    assert exact.operator == "==" and torch_req[0].specifier.contains(exact.version)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])


def test_the_image_builds_the_package_from_exactly_the_files_it_copies(tmp_path):
    """The Dockerfile's `pip install .` sees only what its COPY steps before it put in the image (tracked,
    not .dockerignored): stage exactly those files and build the wheel from them (offline, no deps), as
    the image build does; the wheel holds the library and no weights."""
    import zipfile

    steps = dockerfile()
    install = next(
        i for i, (op, a) in enumerate(steps) if op == "RUN" and re.search(r"pip install \.(\s|$)", a)
    )
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    stage = tmp_path / "image"
    for op, args in steps[:install]:
        if op != "COPY":
            continue
        *sources, dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            tracked = subprocess.run(
                ["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True
            )
            for rel in tracked.stdout.split():
                if dockerignored(rel, patterns):
                    continue
                inner = rel[len(source.rstrip("/")) + 1 :] if source.endswith("/") else Path(rel).name
                target = stage / dest / inner if dest.endswith("/") else stage / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / rel, target)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "wheel")],
        cwd=stage, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "wheel").glob("astra_platform-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "astra/__init__.py" in names and "astra/model/transformer.py" in names
    assert not [n for n in names if n.endswith(".safetensors") or n.startswith(("platform/", "tests/"))]


# ----------------------------------------------------------------------------- KubeRay


def test_manifests_kinds_and_resources():
    kinds = {name: manifest(name)["kind"] for name in MANIFESTS}
    assert kinds == {"raycluster.yaml": "RayCluster", "rayjob-encode.yaml": "RayJob",
                     "rayjob-train.yaml": "RayJob", "rayservice.yaml": "RayService"}  # fmt: skip
    for name in MANIFESTS:
        doc = manifest(name)
        assert doc["apiVersion"] == "ray.io/v1", name
        spec = cluster_spec(doc)
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], name
        for c in containers(spec):
            assert c["resources"]["limits"] == c["resources"]["requests"], name  # a pod fits or waits
        for g in spec.get("workerGroupSpecs", []):
            assert g.get("minReplicas", 0) <= g["replicas"] <= g["maxReplicas"], (name, g["groupName"])
    # the same GPUs and no more CPUs than the launcher's node types of the same name
    spec, nodes = cluster_spec(manifest("raycluster.yaml")), cluster_config()["available_node_types"]
    assert {g["groupName"] for g in spec["workerGroupSpecs"]} == {"encode", "train", "serve"}
    for g in spec["workerGroupSpecs"]:
        node = nodes[g["groupName"]]
        assert gpus(g) == node["resources"]["GPU"], g["groupName"]
        (c,) = g["template"]["spec"]["containers"]
        assert float(c["resources"]["limits"]["cpu"]) <= node["resources"]["CPU"]
        assert g["maxReplicas"] == node["max_workers"], g["groupName"]


def without_counts(g: dict) -> dict:
    return {k: v for k, v in g.items() if k not in ("replicas", "minReplicas", "maxReplicas")}


@pytest.mark.parametrize(
    "name, groups",
    [("rayjob-encode.yaml", ["encode"]), ("rayjob-train.yaml", ["train"]), ("rayservice.yaml", ["serve"])],
)
def test_pod_templates_are_raycluster_copies(name, groups):
    reference, spec = cluster_spec(manifest("raycluster.yaml")), cluster_spec(manifest(name))
    assert spec["headGroupSpec"] == reference["headGroupSpec"]
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == groups
    for g in groups:
        assert without_counts(group(spec, g)) == without_counts(group(reference, g))


@pytest.mark.parametrize("name", ["rayjob-encode.yaml", "rayjob-train.yaml"])
def test_rayjob_entrypoints_load_with_the_jobs_own_config(name):
    doc = manifest(name)
    script, overrides = job_command(shlex.split(doc["spec"]["entrypoint"]))
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    config = LOADERS[script](None, overrides)
    assert "preset=wan2.1-1.3b" in overrides and config.ray.ship_library is False  # the image's library
    spec = cluster_spec(doc)
    if script == "jobs/encode.py":
        assert config.store.uri.startswith("s3://") and config.manifest.startswith("s3://")
        assert config.compute.vae_num_gpus > 0 and gpus(group(spec, "encode")) >= config.compute.vae_num_gpus
    else:
        resolve_train_paths(config)  # s3:// storage needs a tracking server: given
        assert config.data.store.uri.startswith("s3://") and config.storage_path.startswith("s3://")
        assert config.tracking.tracking_uri.startswith("http")
        g = group(spec, "train")
        assert g["replicas"] * gpus(g) == config.parallel.workers and config.parallel.use_gpu
    # weights are read from the volume every pod mounts
    for path in [v for v in (o.split("=", 1)[1] for o in overrides) if v.startswith("/")]:
        assert path.startswith("/models/"), path
    assert all(
        {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
        for c in containers(spec)
    )


def test_a_misspelled_override_fails_the_loader():
    """What the entrypoint checks rely on: a wrong field name is an error, not ignored."""
    with pytest.raises(ConfigError, match=r"did you mean 'data.store'"):
        load_train_config(None, ["preset=wan2.1-1.3b", "data.stor.uri=s3://b/store"])
    with pytest.raises(ConfigError, match=r"store\.url"):
        load_encode_config(None, ["manifest=s3://b/m.jsonl", "store.url=s3://b/store"])


def test_rayservice_serves_infra_serve_config():
    doc = manifest("rayservice.yaml")
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == load(ROOT / "infra" / "serve_config.yaml")
    replicas = serve_args().replicas
    g = group(cluster_spec(doc), "serve")
    assert g["maxReplicas"] * gpus(g) >= replicas.max_replicas * replicas.num_gpus
    assert g["minReplicas"] * gpus(g) >= replicas.min_replicas * replicas.num_gpus


# ----------------------------------------------------------------------------- the README's commands


def test_readme_cluster_commands_name_real_files_and_fields():
    commands = [shlex.split(c, comments=True) for c in readme_commands()]
    jobs = [tokens for tokens in commands if tokens[:3] == ["ray", "job", "submit"]]
    assert {job_command(tokens)[0] for tokens in jobs} == set(LOADERS)
    for tokens in jobs:
        script, overrides = job_command(tokens)
        assert tokens[tokens.index("--working-dir") + 1] == "."
        config = LOADERS[script](None, overrides)
        if script == "jobs/train.py":
            resolve_train_paths(config)
    files = []
    for tokens in commands:
        if tokens[:2] in (["kubectl", "apply"], ["docker", "build"]):
            files.append(tokens[tokens.index("-f") + 1])
        if tokens[:2] in (["ray", "up"], ["serve", "deploy"]):
            files.append(tokens[2])
        if tokens[:2] == ["docker", "build"]:
            assert tokens[tokens.index("-t") + 1] == dockerfile_tag()
    assert {"ray_cluster.yaml", "infra/serve_config.yaml", "infra/docker/Dockerfile"} <= set(files)
    assert {f"infra/k8s/{name}" for name in MANIFESTS} <= set(files)
    for f in files:
        assert (ROOT / f).is_file(), f
