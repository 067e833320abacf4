"""What can be checked of the container set-up without a Docker engine: the files parse, and every command,
entry point and environment variable they use is real."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.cli import OPENMP_SPIN_COUNT, build_parser, configure_openmp
from service.config import Settings, env_var, settings_markdown

ROOT = Path(__file__).resolve().parent.parent


class ComposeLoader(yaml.SafeLoader):
    """Safe YAML plus Compose's `!reset` / `!override` tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node)
                              if isinstance(node, yaml.MappingNode) else loader.construct_sequence(node))


def load_compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def cli_commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)


def setting_env_vars() -> set[str]:
    return {env_var(name) for name in Settings.model_fields}


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_compose_files_parse(name: str) -> None:
    data = load_compose(name)
    assert "services" in data


def test_compose_has_redis_api_and_scalable_worker() -> None:
    services = load_compose("docker-compose.yml")["services"]
    assert {"redis", "api", "worker"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert "container_name" not in services[name]  # --scale needs generated names
    assert "ports" not in services["worker"]


def test_cpu_override_drops_gpu_reservation() -> None:
    services = load_compose("docker-compose.cpu.yml")["services"]
    for name in ("api", "worker"):
        assert services[name]["deploy"] is None
        assert services[name]["environment"]["FISHER_GUARD_DEVICE"] == "cpu"


def test_every_compose_command_is_a_cli_command() -> None:
    commands = cli_commands()
    for file in ("docker-compose.yml",):
        for name, service in load_compose(file)["services"].items():
            if "build" not in service:  # Redis, Prometheus: not this image
                continue
            command = service["command"]
            assert command[0] in commands, f"{file}: service {name} runs unknown command {command[0]!r}"
            build_parser().parse_args(command)  # the flags parse too


def test_every_compose_variable_is_a_setting() -> None:
    known = setting_env_vars()
    for file in ("docker-compose.yml", "docker-compose.cpu.yml"):
        for name, service in load_compose(file)["services"].items():
            for key in (service.get("environment") or {}):
                if key.startswith("FISHER_GUARD_"):
                    assert key in known, f"{file}: {name} sets {key}, which is not a setting"


# ${VARS} that compose itself reads (from .env or the shell), not the service: image tag, published port, the
# host folder of user models and Redis' password (the service gets it inside FISHER_GUARD_REDIS_URL).
# Also the containers' memory limit, Prometheus' published port and the file of the API key it scrapes with.
COMPOSE_ONLY_VARIABLES = {"FISHER_GUARD_IMAGE", "FISHER_GUARD_PUBLISH_PORT", "FISHER_GUARD_USER_MODELS",
                          "FISHER_GUARD_REDIS_PASSWORD", "FISHER_GUARD_MEM_LIMIT", "FISHER_GUARD_PROMETHEUS_PORT",
                          "FISHER_GUARD_METRICS_KEY_FILE"}


def test_every_interpolated_compose_variable_is_a_setting_or_compose_only() -> None:
    """A typo in a ${FISHER_GUARD_...} (compose substitutes an empty string and only warns) fails here."""
    known = setting_env_vars()
    for file in ("docker-compose.yml", "docker-compose.cpu.yml"):
        used = set(re.findall(r"\$\{(FISHER_GUARD_\w+)", (ROOT / file).read_text()))
        unknown = used - known - COMPOSE_ONLY_VARIABLES
        assert not unknown, f"{file} uses {sorted(unknown)}: neither a setting nor a compose-only variable"
    assert not COMPOSE_ONLY_VARIABLES & known, "a compose-only variable is also a setting: drop it from the list"


def test_dockerfile_entry_points_exist() -> None:
    text = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+)(?::(\d+))?$", text, re.M)
    assert user and int(user.group(1)) != 0, "the image must run as a non-root user, given by uid"
    assert re.search(rf"^COPY --chown={user.group(1)}:\d+ models ", text, re.M), "models/ must be the service's"
    assert "HEALTHCHECK" in text and "/health/ready" in text and "/health/live" not in text
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M).group(1)
    assert entry == "fisher-guard"
    cmd = re.search(r"^CMD \[(.*)\]", text, re.M).group(1)
    build_parser().parse_args(shlex.split(cmd.replace(",", " ")))
    for key in re.findall(r"(FISHER_GUARD_\w+)=", text):
        assert key in setting_env_vars(), f"Dockerfile sets {key}, which is not a setting"
    lock_copy = text.index("COPY requirements.lock")
    assert lock_copy < text.index("COPY service"), "dependencies must be installed before the code is copied"
    for path in re.findall(r"^COPY (?:--chown=\S+ )?(\S+) ", text, re.M):
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"


def test_docs_settings_table_is_generated_from_the_class() -> None:
    page = (ROOT / "docs" / "settings.md").read_text()
    block = re.search(r"<!-- settings:begin -->\n(.*?)<!-- settings:end -->", page, re.S)
    assert block, "docs/settings.md needs the generated settings table between settings:begin/end markers"
    assert block.group(1) == settings_markdown(), "docs/settings.md's table is stale: run `fisher-guard settings`"


def test_serve_shares_metrics_between_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --workers N` exports PROMETHEUS_MULTIPROC_DIR for the worker processes: none with one worker; a
    fresh temporary directory removed at exit by default; a configured directory kept, its stale values wiped."""
    from service.commands.serve import MULTIPROCESS_ENV, shared_metrics

    monkeypatch.setenv(MULTIPROCESS_ENV, "unset below, restored after the test")
    monkeypatch.delenv(MULTIPROCESS_ENV)
    with shared_metrics(1, None) as path:
        assert path is None and MULTIPROCESS_ENV not in os.environ
    with shared_metrics(2, None) as path:
        assert path is not None and Path(path).is_dir()
        assert os.environ[MULTIPROCESS_ENV] == path
        (Path(path) / "counter_1.db").write_bytes(b"x")
    assert not Path(path).exists() and MULTIPROCESS_ENV not in os.environ
    configured = tmp_path / "metrics"
    configured.mkdir()
    (configured / "counter_99.db").write_bytes(b"stale")
    (configured / "keep.txt").write_text("not a metrics file")
    with shared_metrics(2, str(configured)) as path:
        assert path == str(configured) and not list(configured.glob("*.db"))
    assert (configured / "keep.txt").exists()


def test_metrics_drop_the_live_gauges_of_dead_processes(tmp_path: Path) -> None:
    """A killed API process leaves its live gauges behind (no shutdown ran): they are dropped at the next scrape;
    those of running processes and every counter stay."""
    import subprocess
    import sys

    from service.api.metrics import drop_dead_processes

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead, alive = int(finished.stdout), os.getpid()
    names = [f"gauge_livesum_{dead}.db", f"gauge_livemin_{dead}.db", f"gauge_livesum_{alive}.db",
             f"counter_{dead}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert drop_dead_processes(str(tmp_path)) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"gauge_livesum_{alive}.db", f"counter_{dead}.db"])


def test_cli_sets_openmp_spin_count_before_torch_loads() -> None:
    """libgomp reads GOMP_SPINCOUNT once, when torch loads: the CLI must set it before any command imports torch."""
    probe = ("import os, sys\n"
             "import service.cli as cli\n"
             "build = cli.build_parser\n"
             "def recording():\n"
             "    print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))\n"
             "    return build()\n"
             "cli.build_parser = recording\n"
             "cli.main(['settings'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0] == f"False {OPENMP_SPIN_COUNT}"


@pytest.mark.parametrize("chosen", [{"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "PASSIVE"}])
def test_cli_keeps_the_users_openmp_choice(chosen: dict[str, str]) -> None:
    environ = dict(chosen)
    configure_openmp(environ)
    assert environ == chosen
    configure_openmp(empty := {})
    assert empty == {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}


def lock_pins(name: str) -> dict[str, str]:
    """`package==version` lines of a lock file, by normalised package name."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            package, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", package).lower()] = version
    return pins


def test_image_lock_pins_the_runtime_and_no_development_tools() -> None:
    """The image installs requirements.lock: every dependency of the package pinned, the test tools (pinned in
    requirements-dev.lock for `make install`) left out."""
    runtime, dev = lock_pins("requirements.lock"), lock_pins("requirements-dev.lock")
    assert not runtime.keys() & dev.keys()
    assert {"ruff", "schemathesis", "hypothesis"} <= dev.keys()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {re.sub(r"[-_.]+", "-", re.split(r"[\[=<>~ ]", d)[0]).lower() for d in project["dependencies"]}
    # the client distribution lives in this repository (client/): installed from there, never from a registry
    local = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["name"]
    assert local in required and local not in runtime
    required.discard(local)
    assert required <= runtime.keys(), f"not pinned: {sorted(required - runtime.keys())}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "./client" in dockerfile or "client/" in dockerfile
    assert "requirements.lock" in dockerfile and "requirements-dev.lock" not in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.lock -r requirements-dev.lock" in makefile


def test_compose_redis_needs_a_password_and_never_evicts() -> None:
    services = load_compose("docker-compose.yml")["services"]
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    password = command[command.index("--requirepass") + 1]
    assert password.startswith("${FISHER_GUARD_REDIS_PASSWORD:?"), "the password comes from .env, and must be set"
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith("${FISHER_GUARD_REDIS_PASSWORD:?")
    health = " ".join(services["redis"]["healthcheck"]["test"])
    assert "PONG" in health, "redis-cli exits 0 on a NOAUTH reply: the healthcheck must look for PONG"
    assert "PASSWORD" not in health and " -a " not in health, "the password stays off the command line"
    for name in ("api", "worker"):
        url = services[name]["environment"]["FISHER_GUARD_REDIS_URL"]
        assert url.startswith("redis://:${FISHER_GUARD_REDIS_PASSWORD:?") and url.endswith("@redis:6379/0")


def test_compose_models_volume_is_shared_and_writable() -> None:
    data = load_compose("docker-compose.yml")
    for name in ("api", "worker"):
        volumes = data["services"][name]["volumes"]
        assert "models:/app/models" in volumes, f"{name} must see the activated detectors"
        assert any(v.endswith(":/data/models:ro") for v in volumes)
    assert "models" in data["volumes"]


def test_compose_api_health_is_readiness() -> None:
    api = load_compose("docker-compose.yml")["services"]["api"]
    assert "/health/ready" in " ".join(api["healthcheck"]["test"])


def test_the_env_file_is_never_committed_nor_copied_into_the_image() -> None:
    for ignore in (".gitignore", ".dockerignore"):
        assert ".env" in (ROOT / ignore).read_text().split(), f"{ignore} must list .env"
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^FISHER_GUARD_REDIS_PASSWORD=$", example, re.M), "empty: compose refuses to start unset"
    for key in re.findall(r"^(FISHER_GUARD_\w+)=", example, re.M):
        assert key in setting_env_vars() | {"FISHER_GUARD_REDIS_PASSWORD"}, key


def test_git_ignores_the_env_file_but_not_its_example() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    check = ["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index"]
    assert subprocess.run([*check, ".env"]).returncode == 0, ".env must be ignored by git"
    assert subprocess.run([*check, ".env.example"]).returncode == 1, ".env.example must be committable"


def test_dockerfile_healthcheck_follows_the_serve_port() -> None:
    """The image's check is for its default command, `serve`, which listens on FISHER_GUARD_PORT."""
    text = (ROOT / "Dockerfile").read_text()
    check = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", text, re.M | re.S).group(1)
    assert "/health/ready" in check and "FISHER_GUARD_PORT" in check
    assert re.search(r"^CMD \[\"serve\"\]$", text, re.M)


# --- the image: base as a build argument, `make image` -------------------------------------------------------------

def test_dockerfile_base_is_an_argument_with_the_public_default() -> None:
    """The same Dockerfile builds on python:3.11-slim and on a local base (deploy/prove-image.sh)."""
    text = (ROOT / "Dockerfile").read_text()
    arg = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert arg and arg.group(1) == "python:3.11-slim"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert arg.start() < text.index("FROM "), "an ARG used by FROM must come before it"
    # the base's Python (3.11: python:3.11-slim, Debian bookworm's python3) satisfies the package's requires-python
    from packaging.specifiers import SpecifierSet

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in SpecifierSet(requires)
    assert "python3 -m venv /opt/venv" in text and re.search(r"PATH=/opt/venv/bin:\$PATH", text), \
        "pip installs go to a venv: Debian's system Python refuses them (PEP 668)"


def make_dry_run(**variables: str) -> list[str]:
    """The commands `make image` would run, with these variables."""
    out = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), "image", *(f"{k}={v}" for k, v in variables.items())],
                         capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in out.stdout.splitlines() if " build " in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_image_builds_the_dockerfile_with_docker_or_buildah() -> None:
    (docker,) = make_dry_run(IMAGE_BUILDER="docker", IMAGE="registry.example/fg:1")
    assert docker[:2] == ["docker", "build"] and "--format" not in docker
    assert docker[docker.index("-t") + 1] == "registry.example/fg:1" and docker[-1] == "."
    assert docker[docker.index("--build-arg") + 1] == "BASE_IMAGE=python:3.11-slim"
    (buildah,) = make_dry_run(IMAGE_BUILDER="buildah --storage-driver vfs", BASE_IMAGE="localhost/base:1",
                              IMAGE_BUILD_FLAGS="--isolation chroot")
    assert buildah[:4] == ["buildah", "--storage-driver", "vfs", "build"]
    assert buildah[buildah.index("--format") + 1] == "docker", "OCI images drop the HEALTHCHECK"
    assert buildah[buildah.index("--isolation") + 1] == "chroot"
    assert buildah[buildah.index("--build-arg") + 1] == "BASE_IMAGE=localhost/base:1"


def test_the_image_proof_script_parses_and_builds_through_make_image() -> None:
    script = ROOT / "deploy" / "prove-image.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert re.search(r"make -C \"\$ROOT\" image ", text), "the proof builds what users build: `make image`"
    assert "--user \"$UID_IN_IMAGE" in text and "UID_IN_IMAGE=10001" in text
    assert (ROOT / "bench" / "results" / "image-build.md").exists(), "the proof's record"


# --- compose: memory limits, log rotation, Prometheus ---------------------------------------------------------------

def compose_default(value: str) -> str:
    """`${VAR:-default}` as compose resolves it with VAR unset; other strings as they are."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return match.group(1) if match else value


def size_bytes(text: str) -> int:
    """'768mb' (Redis) or '4g' (compose) in bytes; both count in powers of 1024."""
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", text.lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_compose_services_rotate_their_logs() -> None:
    for name, service in load_compose("docker-compose.yml")["services"].items():
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file", f"{name}: logs grow without bound"
        options = logging["options"]
        assert size_bytes(options["max-size"]) <= 100 * 1024 ** 2 and int(options["max-file"]) >= 2


def test_compose_services_have_memory_limits_the_cpu_override_keeps() -> None:
    services = load_compose("docker-compose.yml")["services"]
    for name, service in services.items():
        assert "mem_limit" in service, f"{name} has no memory limit"
        assert size_bytes(compose_default(str(service["mem_limit"]))) >= 512 * 1024 ** 2
    for name, override in load_compose("docker-compose.cpu.yml")["services"].items():
        assert "mem_limit" not in override and (override.get("deploy") or {}) == {}, \
            f"the CPU override resets {name}'s deploy key: its memory limit must live outside it"
    command = services["redis"]["command"]
    maxmemory = size_bytes(command[command.index("--maxmemory") + 1])
    assert maxmemory < size_bytes(services["redis"]["mem_limit"]), "Redis must refuse writes before it is killed"


def test_compose_prometheus_scrapes_the_api_and_every_worker() -> None:
    data = load_compose("docker-compose.yml")
    services = data["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"], "off unless asked for"
    mount = next(v for v in prometheus["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ports = {"api": int(services["api"]["command"][services["api"]["command"].index("--port") + 1]),
             "worker": int(services["worker"]["environment"]["FISHER_GUARD_WORKER_METRICS_PORT"])}
    for job in jobs.values():
        (discovery,) = job["dns_sd_configs"]
        (name,) = discovery["names"]
        assert name in services and discovery["port"] == ports[name], f"{job['job_name']} scrapes {name} wrongly"
        assert job["metrics_path"] == "/metrics"
    assert {d["dns_sd_configs"][0]["names"][0] for d in jobs.values()} == {"api", "worker"}
    key_file = jobs["fisher-guard-api"]["authorization"]["credentials_file"]
    assert key_file == f"/run/secrets/{prometheus['secrets'][0]}" and prometheus["secrets"][0] in data["secrets"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")
def test_prometheus_config_passes_promtool() -> None:
    subprocess.run(["promtool", "check", "config", "--syntax-only", str(ROOT / "deploy" / "prometheus.yml")],
                   check=True, capture_output=True)


# --- Kubernetes (deploy/kubernetes): schemas, and agreement with the image, the CLI, the settings and the routes ----

K8S = ROOT / "deploy" / "kubernetes"
# the oldest and the newest Kubernetes the manifests are checked against (kubernetes-validate's schemas, strict)
K8S_VERSIONS = ("1.30.0", "1.37.0")


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def strategic_merge(base: object, patch: object) -> object:
    """The part of kustomize's strategic merge that the overlays use: maps merge key by key, lists of named items
    (containers, env) merge by name, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()}}
    named = lambda items: isinstance(items, list) and all(isinstance(i, dict) and "name" in i for i in items)
    if named(base) and named(patch):
        by_name = {item["name"]: item for item in patch}
        merged = [strategic_merge(item, by_name.pop(item["name"])) if item["name"] in by_name else item
                  for item in base]
        return merged + list(by_name.values())
    return patch


def render(folder: Path) -> list[dict]:
    """The resources a kustomization folder produces: its resources (folders rendered first), then its patches
    applied to the resource of the same kind and name, the images set."""
    spec = kustomization(folder)
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        docs += render(path) if path.is_dir() else documents(path)
    for entry in spec.get("patches", []):
        for patch in documents(folder / entry["path"]):
            (index,) = [i for i, d in enumerate(docs)
                        if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])]
            docs[index] = strategic_merge(docs[index], patch)
    images = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in spec.get("images", [])}
    for doc in docs:
        for container in pod_containers(doc):
            container["image"] = images.get(container["image"], container["image"])
    return docs


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "ServingRuntime":
        return doc["spec"]
    return None


def pod_containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc) or {}
    return spec.get("containers", []) + spec.get("initContainers", [])


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


BASE, GPU, KSERVE = render(K8S / "base"), render(K8S / "gpu"), render(K8S / "kserve")
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}


def test_kustomizations_name_every_manifest_in_their_folder() -> None:
    """No manifest lies unused beside a kustomization, and every one it names exists."""
    for folder in (K8S / "base", K8S / "gpu", K8S / "kserve"):
        spec = kustomization(folder)
        named = set(spec.get("resources", [])) | {p["path"] for p in spec.get("patches", [])}
        files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert {n for n in named if not n.startswith("..")} == files, folder


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubernetes_manifests_validate_against_the_schemas(overlay: str, version: str) -> None:
    import kubernetes_validate

    docs = {"base": BASE, "gpu": GPU}[overlay]
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler",
                                         "ConfigMap", "PersistentVolumeClaim", "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    import kubernetes_validate

    api = find(BASE, "Deployment", "fisher-guard-api")
    broken = strategic_merge(api, {"spec": {"template": {"spec": {"containers": [
        {"name": "api", "readinessProbe": {"httpGet": {"path": "/health/ready", "prot": 8000}}}]}}}})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def kserve_model_errors(value: object, type_name: str, where: str) -> list[str]:
    """What in `value` the KServe SDK's model of `type_name` (its CRD fields; core types from the Kubernetes client)
    does not allow: unknown fields, missing required ones, values outside their enums."""
    import kserve.models
    import kubernetes.client.models

    # the SDKs spell containers two ways: list[X] / dict(str, X) (KServe), List[X] / Dict[str, X] (Kubernetes)
    if re.fullmatch(r"[lL]ist\[.*\]", type_name):
        return [e for i, item in enumerate(value) for e in kserve_model_errors(item, type_name[5:-1], f"{where}[{i}]")]
    if re.fullmatch(r"dict\(str, .*\)|Dict\[str, .*\]", type_name):
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for k, item in value.items() for e in kserve_model_errors(item, inner, f"{where}.{k}")]
    primitives = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in primitives:
        ok = isinstance(value, primitives[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{where}: {value!r} is not {type_name}"]
    model = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name)
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not a {type_name}"]
    python_name = {json: py for py, json in model.attribute_map.items()}
    errors = [f"{where}.{key}: no such field of {type_name}" for key in value if key not in python_name]
    known = {python_name[k]: v for k, v in value.items() if k in python_name}
    for name, item in known.items():
        errors += kserve_model_errors(item, model.openapi_types[name], f"{where}.{model.attribute_map[name]}")
    try:
        model(**known)  # the generated setters refuse a missing required field or a value outside an enum
    except ValueError as exc:
        errors.append(f"{where}: {exc}")
    return errors


def test_kserve_manifests_match_the_kserve_models() -> None:
    types = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
             ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService"}
    assert {(d["apiVersion"], d["kind"]) for d in KSERVE} == set(types)
    for doc in KSERVE:
        assert not kserve_model_errors(doc, types[doc["apiVersion"], doc["kind"]], doc["kind"])
    runtime = find(KSERVE, "ServingRuntime", "fisher-guard")
    broken = strategic_merge(runtime, {"spec": {"supportedModelFormats": [{"name": "fisher-guard", "autoselect": 1}]}})
    assert kserve_model_errors(broken, "V1alpha1ServingRuntime", "ServingRuntime") == [
        "ServingRuntime.spec.supportedModelFormats[0].autoselect: no such field of V1alpha1SupportedModelFormat"]
    del broken["spec"]["containers"]
    assert any("containers" in e for e in kserve_model_errors(broken, "V1alpha1ServingRuntime", "ServingRuntime"))


def test_kserve_inference_service_uses_the_runtime() -> None:
    runtime = find(KSERVE, "ServingRuntime", "fisher-guard")
    model = find(KSERVE, "InferenceService", "fisher-guard")["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


@pytest.fixture(scope="module")
def app_paths() -> set[str]:
    """The API's routes, from the app itself (its OpenAPI schema)."""
    from service.api.app import create_app

    return set(create_app(Settings()).openapi()["paths"])


def dockerfile() -> dict:
    text = (ROOT / "Dockerfile").read_text()
    return {"expose": int(re.search(r"^EXPOSE (\d+)$", text, re.M).group(1)),
            "uid": int(re.search(r"^USER (\d+)", text, re.M).group(1)),
            "port": int(re.search(r"FISHER_GUARD_PORT=(\d+)", text).group(1))}


def container_env(doc: dict, container: dict, docs: list[dict]) -> dict[str, str]:
    """What a container's environment holds: its ConfigMaps, then its env entries (`$(VAR)` expanded from earlier
    entries, a secret as a placeholder)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            value = entry["value"]
            for ref in re.findall(r"\$\((\w+)\)", value):
                assert ref in env, f"{doc['metadata']['name']}: {entry['name']} uses $({ref}) before it is defined"
                value = value.replace(f"$({ref})", env[ref])
        else:
            value = f"secret-{entry['valueFrom']['secretKeyRef']['key']}"
        env[entry["name"]] = value
    return env


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process would read from this environment (every FISHER_GUARD_* one a real setting)."""
    for key in list(os.environ):
        if key.startswith("FISHER_GUARD_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("FISHER_GUARD_"):
            assert key in setting_env_vars(), f"{key} is not a setting"
            monkeypatch.setenv(key, value)
    return Settings()


def http_probe_paths(container: dict) -> dict[str, tuple[str, object]]:
    return {kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
            for kind in ("readinessProbe", "livenessProbe", "startupProbe") if "httpGet" in container.get(kind, {})}


def port_number(container: dict, port: object) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubernetes_workloads_agree_with_the_image_cli_settings_and_routes(
        overlay: str, app_paths: set[str], monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {"base": BASE, "gpu": GPU}[overlay]
    image = dockerfile()
    images = {f"{i['newName']}:{i['newTag']}" for i in kustomization(K8S / "base")["images"]}
    parser = build_parser()
    commands = {"fisher-guard-api": "serve", "fisher-guard-worker": "worker"}
    for name, command in commands.items():
        deployment = find(docs, "Deployment", name)
        pod = pod_spec(deployment)
        security = pod["securityContext"]
        assert security["runAsUser"] == image["uid"] and security["runAsNonRoot"] is True
        for container in pod_containers(deployment):
            assert container["image"] in images
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["resources"]["limits"]["memory"]
        (main,) = pod["containers"]
        args = parser.parse_args(main["args"])
        assert main["args"][0] == command and args.handler
        settings = settings_of(container_env(deployment, main, docs), monkeypatch)
        assert settings.redis_url == "redis://:secret-password@fisher-guard-redis:6379/0"
        assert {v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]} == {"fisher-guard-models"}
        assert {m["mountPath"] for m in main["volumeMounts"]} == {str(settings.models_dir)}
        probes = http_probe_paths(main)
        if command == "serve":
            assert port_number(main, "http") == settings.port == image["port"] == image["expose"]
            assert probes["readinessProbe"] == ("/health/ready", "http") and "/health/live" in app_paths
            assert {path for path, _ in probes.values()} <= app_paths
        else:
            assert probes["livenessProbe"][0] == "/metrics"
            assert port_number(main, probes["livenessProbe"][1]) == settings.worker_metrics_port
        assert settings.device == ("cuda" if overlay == "gpu" else "cpu")
        gpus = main["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (1 if overlay == "gpu" else None)
    find(docs, "PersistentVolumeClaim", "fisher-guard-models")


def test_kubernetes_services_select_their_pods_and_name_real_ports() -> None:
    for service in (d for d in BASE if d["kind"] == "Service"):
        (workload,) = [d for d in BASE if d["kind"] in ("Deployment", "StatefulSet")
                       and service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        ports = {p.get("name") for c in pod_spec(workload)["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports, service["metadata"]["name"]
    redis = find(BASE, "StatefulSet", "fisher-guard-redis")
    assert redis["spec"]["serviceName"] == "fisher-guard-redis"
    (container,) = pod_spec(redis)["containers"]
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction" and "--appendonly" in args
    assert size_bytes(args[args.index("--maxmemory") + 1]) < size_bytes(container["resources"]["limits"]["memory"]
                                                                        .replace("Gi", "g"))
    assert "PONG" in " ".join(container["readinessProbe"]["exec"]["command"])


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubernetes_autoscalers_scale_the_api_and_the_workers_apart(overlay: str) -> None:
    docs = {"base": BASE, "gpu": GPU}[overlay]
    targets = {}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = find(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            resource = metric["resource"]["name"]  # utilisation is relative to the request: there must be one
            assert all(c["resources"]["requests"][resource] for c in pod_spec(target)["containers"])
        targets[target["metadata"]["name"]] = hpa["spec"]["maxReplicas"]
    assert set(targets) == {"fisher-guard-api", "fisher-guard-worker"}, "Redis is one replica, never autoscaled"


def test_kserve_runtime_serves_the_v2_protocol_on_its_port(app_paths: set[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = find(KSERVE, "ServingRuntime", "fisher-guard")
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and build_parser().parse_args(container["args"]).handler
    settings = settings_of(container_env(runtime, container, KSERVE), monkeypatch)
    assert [p["containerPort"] for p in container["ports"]] == [settings.port] == [8080]  # KServe's port
    probes = http_probe_paths(container)
    assert probes["readinessProbe"][0] == "/v2/health/ready"
    assert all(path in app_paths and port == settings.port for path, port in probes.values())
    assert container["securityContext"]["runAsUser"] == dockerfile()["uid"]
    assert "/v2/models/{model_name}/infer" in app_paths
