"""The Kubernetes manifests in deploy/k8s: every document validated offline against the API schema
of a named Kubernetes version (kubernetes-validate bundles the schemas), and held to what the
service, the training CLI and the Dockerfiles say, so that none of them can drift alone.

No cluster and no kustomize binary are needed: the kustomization is checked for what it lists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes the manifests are written for: the preStop `sleep` action is on by default
# from 1.30. Validating against the newest schema the package bundles too catches removed APIs.
MIN_KUBERNETES = "1.30"
MODELS_CLAIM = "busi-models"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    """(file relative to deploy/k8s, document) for every manifest but the kustomization."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((str(path.relative_to(K8S)), doc))
    return out


DOCUMENTS = _documents()


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for _, d in DOCUMENTS
        if d["kind"] == kind
        and (name is None or d["metadata"].get("name", d["metadata"].get("generateName")) == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} manifests"
    return found[0]


def _workloads() -> list[dict[str, Any]]:
    return [d for _, d in DOCUMENTS if d["kind"] in ("Deployment", "Job")]


def _api() -> dict[str, Any]:
    return _one("Deployment", "busi-api")


def _api_container() -> dict[str, Any]:
    (container,) = _api()["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _final_stage_env(dockerfile: str) -> dict[str, str]:
    """KEY=value pairs of the ENV instructions of a Dockerfile's final stage."""
    text = re.sub(r"\\\n\s*", " ", (REPO / dockerfile).read_text())
    final = text[text.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def _dockerfile_uid(dockerfile: str) -> int:
    users = re.findall(r"^USER (\d+)", (REPO / dockerfile).read_text(), flags=re.MULTILINE)
    return int(users[-1])


def _mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[dict, dict]]:
    """{mountPath: (volumeMount, volume)} of one container."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


# --- the manifests are valid Kubernetes objects -------------------------------------------------


def test_kustomization_lists_every_manifest_of_its_folder():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    assert kustomization["namespace"] == _one("Namespace")["metadata"]["name"]
    images = {image["name"] for image in kustomization["images"]}
    used = {c["image"].split(":")[0] for w in _workloads() for c in _containers(w)}
    assert images <= used


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("version", [MIN_KUBERNETES, "latest"])
def test_every_manifest_validates_against_the_kubernetes_api_schema(version):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version() if version == "latest" else version
    assert len(DOCUMENTS) >= 10
    for name, doc in DOCUMENTS:
        try:
            # strict: unknown fields (a typo, a field of another version) fail too
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} invalid for Kubernetes {version}: {exc.message}")


def test_a_broken_manifest_fails_the_schema_check():
    """The check above can fail: a misspelt probe field and a string replica count are caught."""
    import kubernetes_validate

    broken = yaml.safe_load((K8S / "deployment.yaml").read_text())
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, MIN_KUBERNETES, strict=True)
    broken = yaml.safe_load((K8S / "deployment.yaml").read_text())
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, MIN_KUBERNETES, strict=True)


# --- the api Deployment agrees with the service and its image ----------------------------------


def test_api_environment_names_only_real_settings_and_each_value_parses():
    from service.settings import Settings

    env = _env(_api_container())
    assert set(env) <= set(Settings.model_fields), set(env) - set(Settings.model_fields)
    # the ones this deployment depends on are written out, not left to the image or the code
    assert set(env) >= {"MODEL_DIR", "HOST", "PORT", "TORCH_THREADS", "RELOAD_INTERVAL_S",
                        "GRACEFUL_SHUTDOWN_S", "MAX_PIXELS", "MAX_BODY_BYTES"}  # fmt: skip
    settings = Settings(**env)  # raises on a value the service would refuse at start-up
    image_env = _final_stage_env("Dockerfile.api")
    for name in ("MODEL_DIR", "HOST", "PORT"):
        assert env[name] == image_env[name], (
            f"{name}: manifest {env[name]}, image {image_env[name]}"
        )
    cpus = int(_api_container()["resources"]["limits"]["cpu"])
    assert settings.TORCH_THREADS == cpus  # a lone request's forward gets every core
    assert settings.TORCH_THREADS_BATCHED == cpus  # so does a batch's (bench: ONNX Runtime)


def test_api_reads_its_keys_from_a_secret_and_keeps_an_audit_volume():
    pod = _api()["spec"]["template"]["spec"]
    container = _api_container()
    env = _env(container)
    mounts = _mounts(pod, container)
    keys = Path(env["API_KEYS_FILE"])
    mount, volume = mounts[str(keys.parent)]
    assert mount["readOnly"] is True and "subPath" not in mount  # so Secret edits reach it
    assert {"key": "api_keys", "path": keys.name} in volume["secret"]["items"]
    assert env["API_KEYS_FILE"] == _final_stage_env("Dockerfile.api")["API_KEYS_FILE"]
    audit_dir = str(Path(env["AUDIT_LOG_FILE"]).parent)
    assert audit_dir in mounts and not mounts[audit_dir][0].get("readOnly")


def test_probes_and_ports_match_the_service():
    openapi = (REPO / "openapi" / "openapi.json").read_text()
    container = _api_container()
    (port,) = container["ports"]
    settings_port = int(_env(container)["PORT"])
    exposed = re.findall(r"^EXPOSE (\d+)", (REPO / "Dockerfile.api").read_text(), re.MULTILINE)
    assert port["containerPort"] == settings_port == int(exposed[-1])
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in (port["name"], port["containerPort"])
        assert f'"{probe["path"]}"' in openapi  # a route the app serves
    service = _one("Service", "busi-api")
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    annotations = _api()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics" and '"/metrics"' in openapi
    policy_ports = [p["port"] for rule in _one("NetworkPolicy")["spec"]["ingress"]
                    for p in rule["ports"]]  # fmt: skip
    assert policy_ports and all(p in (port["name"], port["containerPort"]) for p in policy_ports)


def test_termination_grace_covers_the_pre_stop_sleep_and_the_drain():
    pod = _api()["spec"]["template"]["spec"]
    container = _api_container()
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(_env(container)["GRACEFUL_SHUTDOWN_S"])
    # a margin for the lifespan shutdown and the exit after the drain's deadline
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    assert pre_stop >= 3  # long enough for endpoint removal to reach kube-proxy and ingress


def test_api_resources_are_guaranteed_whole_cpus():
    resources = _api_container()["resources"]
    for resource in ("cpu", "memory"):  # Guaranteed QoS
        assert resources["requests"][resource] == resources["limits"][resource]
    assert re.fullmatch(r"[1-9]\d*", resources["limits"]["cpu"]), "whole CPUs, for exclusivity"
    memory = resources["limits"]["memory"]
    # at least the bench's 718 MiB resident peak plus a live swap and the largest request
    assert re.fullmatch(r"\d+Gi", memory) and int(memory[:-2]) >= 1


def test_every_pod_runs_as_the_image_user_with_a_read_only_root():
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        context = pod["securityContext"]
        images = {c["image"].split(":")[0] for c in pod["containers"]}
        dockerfile = "Dockerfile.train" if images == {"busi-train"} else "Dockerfile.api"
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == _dockerfile_uid(dockerfile)
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "limits" in container["resources"]


def test_model_volume_is_read_only_to_the_api_and_written_only_by_jobs():
    claim = _one("PersistentVolumeClaim", MODELS_CLAIM)
    assert set(claim["spec"]["accessModes"]) <= {"ReadWriteMany", "ReadOnlyMany"}
    pod = _api()["spec"]["template"]["spec"]
    model_dir = _env(_api_container())["MODEL_DIR"]
    mount, volume = _mounts(pod, _api_container())[model_dir]
    assert volume["persistentVolumeClaim"] == {"claimName": MODELS_CLAIM, "readOnly": True}
    assert mount["readOnly"] is True
    assert _final_stage_env("Dockerfile.api")["MODEL_DIR"] == model_dir
    assert "/tmp" in _mounts(pod, _api_container())  # a writable /tmp beside the read-only root
    writers = []
    for workload in _workloads():
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            for mount, volume in _mounts(spec, container).values():
                source = volume.get("persistentVolumeClaim", {})
                if source.get("claimName") == MODELS_CLAIM and not mount.get("readOnly"):
                    writers.append(workload)
    assert writers and all(w["kind"] == "Job" for w in writers)


def test_autoscaler_budget_and_policy_select_the_api_pods():
    api = _api()
    labels = api["spec"]["template"]["metadata"]["labels"]
    selector = api["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": api["metadata"]["name"],
    }
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # a voluntary disruption never takes the last replica
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    assert _one("Service")["spec"]["selector"].items() <= labels.items()
    policy = _one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    namespaces = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for p in sources}  # fmt: skip
    assert len(sources) == 2 and len(namespaces) == 2  # the ingress controller and Prometheus


# --- the Jobs: the seed and the training run ---------------------------------------------------


def test_seed_job_runs_the_script_the_api_image_ships():
    job = _one("Job", "busi-seed-models")
    (container,) = _containers(job)
    assert container["image"].split(":")[0] == "busi-api"
    assert container["command"] == ["/app/seed-models.sh"]
    assert "COPY deploy/seed-models.sh /app/seed-models.sh" in (REPO / "Dockerfile.api").read_text()
    mounts = _mounts(job["spec"]["template"]["spec"], container)
    assert _env(container)["MODEL_DIR"] in mounts


def test_training_job_runs_the_training_cli_under_torchrun_into_the_model_volume():
    from training import joint

    job = _one("Job", "busi-train-joint-")
    (container,) = _containers(job)
    command = container["command"]
    # the image's ENTRYPOINT (python -m training), started by torchrun
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert command[-2:] == ["-m", "training"]
    assert any(re.fullmatch(r"--nproc-per-node=\d+", part) for part in command)
    assert container["args"][0] == "fit"
    args = joint.parse_fit_args(container["args"][1:])  # exits on a flag the CLI does not know
    joint.get_preset(args.preset)
    mounts = _mounts(job["spec"]["template"]["spec"], container)
    model_mount, model_volume = mounts[str(args.model_dir)]
    assert model_volume["persistentVolumeClaim"]["claimName"] == MODELS_CLAIM
    assert not model_mount.get("readOnly")
    assert mounts[str(args.data_path)][0]["readOnly"] is True
    runs = [path for path in mounts if str(args.output_dir).startswith(path + "/")]
    assert runs == ["/work/runs"] and "/work/runs" in (REPO / "Dockerfile.train").read_text()
    assert "/tmp" in mounts and _final_stage_env("Dockerfile.train")["MPLCONFIGDIR"].startswith(
        "/tmp/"
    )
    threads = int(args.threads)
    assert threads == int(container["resources"]["limits"]["cpu"])
