"""FisherGuardClient: screening, spectra, attacks and jobs of a running fisher-guard server over HTTP (httpx).

Errors come back as `FisherGuardError` carrying the server's problem+json code and sentence. Arrays need numpy
(`pip install 'fisher-guard-client[arrays]'`); uploading files does not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    import numpy as np

FILE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".npy": "application/octet-stream"}


class FisherGuardError(RuntimeError):
    """An error answer of the server: HTTP status, machine-readable code and the server's sentence."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


def numpy_module(purpose: str) -> Any:
    """numpy, imported when arrays are used; an ImportError that says how to install it otherwise."""
    try:
        import numpy
    except ImportError as exc:
        raise ImportError(f"{purpose} needs numpy: pip install 'fisher-guard-client[arrays]'") from exc
    return numpy


def float32_array(images: Any, purpose: str) -> np.ndarray:
    """`images` (an array or nested lists) as float32, the dtype the server reads."""
    return numpy_module(purpose).asarray(images, dtype="float32")


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class FisherGuardClient:
    """Screening, spectra, attacks and jobs over HTTP. `batch_size` splits large inputs into several requests."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 60.0, batch_size: int = 64, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.batch_size = batch_size
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> FisherGuardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {}
            raise FisherGuardError(response.status_code, problem.get("code", "http_error"),
                                   problem.get("detail", response.text[:200]))
        return response.json()

    # ---- models and health ----
    def ready(self) -> bool:
        return self.http.get("/health/ready").status_code == 200

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models")["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/models/{name}")

    # ---- synchronous endpoints ----
    def screen(self, model: str, images: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
        """Screen an array of images (N, C, H, W) in [0, 1]; one response whose `results` cover all N."""
        body: dict[str, Any] = {} if threshold is None else {"threshold": threshold}
        return self._merge(self._call("POST", f"/v1/models/{model}/screen", json={**body, "tensor": chunk.tolist()})
                           for chunk in batches(float32_array(images, "screen(images)"), self.batch_size))

    def screen_files(self, model: str, paths: Sequence[str | Path], threshold: float | None = None) -> dict[str, Any]:
        """Upload image files (PNG, JPEG, .npy) for screening; `results[i]` answers for `paths[i]` (one image each)."""
        data = {} if threshold is None else {"threshold": str(threshold)}
        return self._merge(self._upload(f"/v1/models/{model}/screen/upload", chunk, data)
                           for chunk in batches(list(paths), self.batch_size))

    def spectrum(self, model: str, images: np.ndarray, k: int = 10, method: str = "auto") -> dict[str, Any]:
        return self._call("POST", f"/v1/models/{model}/spectrum",
                          json={"tensor": float32_array(images, "spectrum(images)").tolist(), "k": k, "method": method})

    def attack(self, model: str, images: np.ndarray, attack: str = "ossa", epsilon: float = 1.0,
               **options: Any) -> dict[str, Any]:
        body = {"tensor": float32_array(images, "attack(images)").tolist(), "attack": attack, "epsilon": epsilon,
                "output": "tensor", **options}
        return self._call("POST", f"/v1/models/{model}/attack", json=body)

    # ---- jobs ----
    def submit_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/jobs", json=spec)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll a job until it ends (succeeded, failed, cancelled); TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.job(job_id)
            if view["status"] in ("succeeded", "failed", "cancelled"):
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def _upload(self, path: str, files: Sequence[str | Path], data: dict[str, str]) -> dict[str, Any]:
        parts = []
        for file in files:
            file = Path(file)
            parts.append(("files", (file.name, file.read_bytes(), FILE_TYPES.get(file.suffix.lower(), "image/png"))))
        return self._call("POST", path, files=parts, data=data)

    @staticmethod
    def _merge(responses: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """One screen response from several: the first one's fields with every result, in order."""
        merged: dict[str, Any] | None = None
        for response in responses:
            if merged is None:
                merged = response
            else:
                merged["results"].extend(response["results"])
                merged["notes"] = sorted(set(merged.get("notes", [])) | set(response.get("notes", [])))
        if merged is None:
            raise ValueError("images: nothing to screen (empty input)")
        return merged
