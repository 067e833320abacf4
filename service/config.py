"""Every setting of the service in one place, read from FISHER_GUARD_* environment variables.

docs/settings.md is generated from this class (`fisher-guard settings`), so the two agree.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Service settings; each field's description is its documentation."""

    model_config = SettingsConfigDict(env_prefix="FISHER_GUARD_", extra="ignore")

    # models and devices
    models_dir: Path = Field(REPO_ROOT / "models", description="Folder of model cards, weights and detectors.")
    user_models_dir: Path | None = Field(None, description="Extra folder of user model cards (mounted volume).")
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu' or 'cuda[:i]'.")
    memory_budget_mb: int = Field(1024, ge=16, description="Jacobian memory the spectrum endpoint may hold at "
                                  "once (MiB): larger batches are computed in chunks that fit.")
    allow_pickled_detectors: bool = Field(False, description="Also load detectors in the legacy pickled format "
                                          "(`<model>.detector.joblib`). Unpickling runs whatever code the file "
                                          "holds: enable it only for files you trust, and better convert them "
                                          "once with `fisher-guard convert-detector`.")
    detector_poll_s: float = Field(2.0, ge=0, description="Seconds between each API process's looks at the active "
                                   "detector card of its models (a stat): a detector activated by any process (CLI "
                                   "`fisher-guard activate-detector`, the API, a rollback) is swapped in without a "
                                   "restart within this time (job workers check at each job's start); 0: never "
                                   "(only the process that activates it over the API swaps at once).")

    # HTTP API (service/api): server, limits, micro-batching, auth
    host: str = Field("127.0.0.1", description="Address `fisher-guard serve` binds to (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="Port `fisher-guard serve` listens on.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads every model once).")
    worker_healthcheck_timeout_s: int = Field(60, ge=1, description="With workers > 1: seconds a worker process "
                                              "may take to answer the supervisor's ping (at start, while it loads "
                                              "its models, and when busy) before it is killed and replaced.")
    model_process: bool = Field(False, description="`serve` runs the models in one separate model process (per "
                                "device), which every API process (`workers` of them) hands its work to over a Unix "
                                "socket, the images through shared memory: requests of all API processes are "
                                "batched together, in one place per device (docs/api.md#model-process). "
                                "`serve` restarts the model process when it dies; meanwhile requests get 503.")
    model_process_socket: str | None = Field(None, description="The model process's Unix socket. Set by `serve` "
                                             "with model_process (in a private temporary folder); set it yourself "
                                             "to run `fisher-guard model-process --socket PATH` apart (a sidecar) "
                                             "and have API processes hand their work to it.")
    model_process_torch_threads: int | None = Field(None, ge=1, description="torch CPU threads of the model "
                                                    "process, for every batch size; unset: api_torch_threads_large_"
                                                    "batch, at most the cores that the API processes leave (cores - "
                                                    "workers, at least 1): on 2 cores with 2 API processes a second "
                                                    "model thread only contended with them (bench/results/serving-"
                                                    "cpu.md).")
    model_process_arena_mb: int = Field(64, ge=1, description="With a model process: shared memory per API process "
                                        "for the images of its requests in flight (MiB); a request that finds it "
                                        "full gets 503, one larger than all of it 422.")
    metrics_multiproc_dir: str | None = Field(None, description="With workers > 1: the directory where the worker "
                                              "processes share their Prometheus metrics, so that /metrics sums "
                                              "them (its *.db files are removed at start-up); unset: "
                                              "PROMETHEUS_MULTIPROC_DIR when set, else a fresh temporary directory "
                                              "removed at exit.")
    api_torch_threads: int = Field(1, ge=1, description="torch CPU threads of each API process (set at start-up). "
                                   "Each model's work runs in one thread; on a busy 2-core machine 2 torch threads "
                                   "spin and made a 1-image screen 20x slower.")
    api_torch_threads_large_batch: int = Field(2, ge=1, description="torch CPU threads for a batch of at least "
                                               "api_large_batch images (a large batch gains from a second core).")
    api_large_batch: int = Field(8, ge=1, description="Batches of this many images or more use "
                                 "api_torch_threads_large_batch threads and oneDNN (with the spectral+noise detector, "
                                 "8 rather than 48 raised micro-batched throughput at concurrency 32 by ~25%; "
                                 "bench/bench_api.py).")
    api_small_batch_onednn: bool = Field(False, description="Use oneDNN (mkldnn) CPU convolutions for batches under "
                                         "api_large_batch; off: for LeNet-5 at batch 1 the plain kernels were "
                                         "~35% faster on this project's 2-core machine.")
    log_level: str = Field("info", description="Log level of the service: debug, info, warning, error.")
    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON objects (with request and "
                                                "job ids) or as human-readable text.")
    worker_metrics_port: int | None = Field(None, ge=1, le=65535, description="Port on which `fisher-guard worker` "
                                            "serves Prometheus metrics (jobs run, failures, durations); unset: none.")
    serve_models: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated model names the API loads; empty: every registered model.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated API keys; when set, every endpoint but health needs one "
        "(Authorization: Bearer KEY or X-API-Key: KEY). Never logged.")
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        [], description="Comma-separated admin API keys: they open every endpoint, like api_keys, and see and "
        "cancel every key's jobs (a plain key sees only the jobs it submitted). Never logged.")
    max_payload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body (bytes); more is 413.")
    max_image_side: int = Field(4096, ge=8, description="Largest width or height an uploaded image may declare "
                                "(checked before decoding: decompression bombs).")
    max_image_pixels: int = Field(4096 * 4096, ge=64, description="Largest width x height an uploaded image may "
                                  "declare (checked before decoding).")
    max_batch_size: int = Field(256, ge=1, description="Most images in one request.")
    max_k: int = Field(100, ge=1, description="Largest k (eigenpairs) a request may ask for.")
    max_epsilon: float = Field(50.0, gt=0, description="Largest L2 epsilon (pixel space [0, 1]) an attack request "
                               "may ask for.")
    max_attack_batch: int = Field(16, ge=1, description="Most images in one request to the iterative attacks "
                                  "(iterative OSSA, BIM, Opt, least-norm search) and to the spectrum with the "
                                  "paper's Algorithm 1 (method power, power-alias); larger work goes to /v1/jobs.")
    max_attack_steps: int = Field(200, ge=1, description="Most iterations an iterative attack request may ask for.")
    batch_max_size: int = Field(64, ge=1, description="Micro-batching: most images grouped into one forward/Jacobian "
                                "batch (1 turns micro-batching off).")
    batch_max_wait_ms: float = Field(5.0, ge=0, description="Micro-batching: longest wait for more requests before a "
                                     "batch runs (ms); only spent while other requests for the model are arriving.")
    queue_capacity: int = Field(1024, ge=1, description="Images that may wait per model; beyond it requests get 503 "
                                "with Retry-After.")
    request_timeout_s: float = Field(30.0, gt=0, description="Longest time a request may take (504 after it); also "
                                     "uvicorn's graceful-shutdown wait for in-flight requests.")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open "
                                        "after a response before the server closes it (idle clients holding "
                                        "connections).")
    request_head_timeout_s: float = Field(10.0, gt=0, description="Seconds a client has to send a complete request "
                                          "head after connecting or after the previous response; then the "
                                          "connection is closed (clients that connect and send nothing, or "
                                          "trickle a head slowly: slowloris).")

    @field_validator("serve_models", "api_keys", "admin_api_keys", "dataset_folders", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        """Accept 'a,b' (environment) as well as a list."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    # jobs (service/jobs): queue backend, limits, crash recovery
    redis_url: str | None = Field(None, description="Redis URL of the job queue, e.g. redis://localhost:6379/0; "
                                  "unset: jobs run in threads inside the API process (in-process backend).")
    jobs_queue: str = Field("fisher-guard", description="Name of the Redis job queue (and prefix of its keys).")
    jobs_result_ttl_s: int = Field(86400, ge=1, description="Seconds a finished job's status, result and artifact "
                                   "are kept.")
    jobs_timeout_s: int = Field(3600, ge=1, description="Longest a job may run (seconds); it then fails.")
    jobs_max_attempts: int = Field(3, ge=1, description="Attempts of a job whose worker dies mid-job (SIGKILL, "
                                   "OOM) before it ends failed; ordinary errors are not retried.")
    jobs_heartbeat_s: int = Field(5, ge=1, description="Seconds between worker heartbeats (and idle workers' "
                                  "checks for abandoned jobs).")
    jobs_lease_s: int = Field(30, ge=2, description="A running job whose worker has sent no heartbeat for this "
                              "long is taken as abandoned and re-queued (the crash-recovery delay).")
    jobs_reconnect_max_s: int = Field(30, ge=1, description="Longest wait of a `fisher-guard worker` between tries "
                                      "to reach Redis again after losing it (the waits double from 1 s).")
    jobs_max_upload_mb: float = Field(64.0, gt=0, description="Largest job upload (all files together), MiB.")
    jobs_max_attack_steps: int = Field(10000, ge=1, description="Most iterations (`steps`) an attack job may ask "
                                       "for: a job's batch cannot be interrupted, so this bounds how long a "
                                       "cancellation or a shutdown waits.")
    jobs_max_params_depth: int = Field(16, ge=2, description="Deepest nesting of a job's JSON params (deeper is "
                                       "422): a deep document would exhaust the recursion of what serialises it.")
    jobs_max_items: int = Field(10000, ge=1, description="Most images in one job (archive members or files).")
    jobs_batch_size: int = Field(256, ge=1, description="Images per engine call inside a job (progress steps).")
    jobs_local_threads: int = Field(1, ge=1, description="Threads of the in-process job backend.")
    jobs_shard_size: int = Field(250, ge=0, description="Redis backend: a screening, least-norm or attack job of more "
                                 "images is split into shards of this many, which free workers run in parallel "
                                 "(0: never split).")
    jobs_worker_threads: int = Field(1, ge=1, description="torch CPU threads of a `fisher-guard worker` (scale out "
                                     "with one worker per core: on a busy 2-core machine one thread was "
                                     "several times faster than two; see bench/results/jobs-cpu.md).")
    jobs_debug: bool = Field(False, description="Tests only: enables the 'debug-crash' job type and "
                             "FISHER_GUARD_JOBS_DEBUG_DELAY_S.")
    jobs_debug_delay_s: float = Field(0.0, ge=0, description="Tests only (with jobs_debug): sleep per batch.")

    # labelled datasets (service/data/datasets.py): server-side names and limits
    dataset_folders: Annotated[list[Path], NoDecode] = Field(
        [], description="Comma-separated folders of server-side datasets: each sub-folder (one folder of PNG/JPEG "
        "files per class, the ImageFolder layout) or .npz file (images, labels) in them is the dataset "
        "`data:<name>` named after it; empty: only the bundled `mnist:*`.")
    dataset_max_items: int = Field(50000, ge=1, description="Most images in one labelled dataset (a folder, zip or "
                                   ".npz, uploaded or server-side); a job upload is also bounded by jobs_max_items.")
    dataset_max_mb: float = Field(2048.0, gt=0, description="Largest labelled dataset, MiB: its file, the declared "
                                  "unpacked size of its archive and its decoded float32 images, each.")

    def model_folders(self) -> list[Path]:
        """The folders searched for model cards: models_dir, then user_models_dir when set."""
        return [Path(self.models_dir)] + ([Path(self.user_models_dir)] if self.user_models_dir else [])


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def env_var(field_name: str) -> str:
    """The environment variable that sets a field."""
    return f"{Settings.model_config['env_prefix']}{field_name.upper()}"


def settings_markdown() -> str:
    """A Markdown table of every setting: variable, default, meaning (docs/settings.md is this output)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, Path):
            default = default.relative_to(REPO_ROOT) if default.is_relative_to(REPO_ROOT) else default
        shown = "" if default is None else str(default)
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{env_var(name)}` | `{shown}` | {description} |")
    return "\n".join(rows) + "\n"
