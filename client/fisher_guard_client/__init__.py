"""fisher-guard-client: a Python client for a running fisher-guard server and the `gate` command for pipelines.

    from fisher_guard_client import FisherGuardClient
    with FisherGuardClient("http://127.0.0.1:8000", api_key="...") as client:
        report = client.screen_files("lenet5", ["digit.png"])      # uploads the files
        report = client.screen("lenet5", images)                    # a (N, C, H, W) array in [0, 1]
        if any(r["adversarial"] for r in report["results"]): ...

It needs httpx only (numpy for arrays), never torch: the engine stays on the server.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["FILE_TYPES", "FisherGuardClient", "FisherGuardError"]


def __getattr__(name: str) -> Any:
    """The client's names, loaded on first use (PEP 562): httpx takes a third of a second to import, which
    `fisher-guard <command> --help` should not pay."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from fisher_guard_client import client

    return getattr(client, name)
