"""What can be checked of the container set-up without a Docker engine: the files parse, and every command,
entry point and environment variable they use is real."""

from __future__ import annotations

import os
import re
import shlex
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
            if name == "redis":
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
COMPOSE_ONLY_VARIABLES = {"FISHER_GUARD_IMAGE", "FISHER_GUARD_PUBLISH_PORT", "FISHER_GUARD_USER_MODELS",
                          "FISHER_GUARD_REDIS_PASSWORD"}


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
    assert required <= runtime.keys(), f"not pinned: {sorted(required - runtime.keys())}"
    dockerfile = (ROOT / "Dockerfile").read_text()
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
