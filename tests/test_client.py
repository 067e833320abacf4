"""The pipeline client and `fisher-guard gate` against a real server process (the e2e fixture's uvicorn)."""

from __future__ import annotations

import numpy as np
import pytest
from test_e2e import digits, png, server  # noqa: F401  (fixtures shared with the end-to-end tests)

from service.cli import main
from service.client import FisherGuardClient, FisherGuardError


@pytest.fixture(scope="module")
def folder(digits, tmp_path_factory):  # noqa: F811
    images, _ = digits
    path = tmp_path_factory.mktemp("incoming")
    for i, image in enumerate(images[:6]):
        (path / f"{i:02d}.png").write_bytes(png(image))
    np.savez(path.parent / "batch.npz", images=images[6:10])
    return path


def test_client_screen_files_and_arrays_agree(server, digits, folder):  # noqa: F811
    base, _, _ = server
    images, _ = digits
    with FisherGuardClient(base, batch_size=4) as client:
        assert client.ready()
        assert "lenet5" in [m["name"] for m in client.models()]
        by_file = client.screen_files("lenet5", sorted(folder.glob("*.png")))
        by_array = client.screen("lenet5", (np.round(images[:6] * 255) / 255).astype(np.float32))
    assert len(by_file["results"]) == len(by_array["results"]) == 6  # merged over two requests of 4 + 2
    for a, b in zip(by_file["results"], by_array["results"], strict=True):
        assert a["prediction"] == b["prediction"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)


def test_client_raises_the_servers_problem(server):  # noqa: F811
    base, _, _ = server
    with FisherGuardClient(base) as client, pytest.raises(FisherGuardError) as err:
        client.screen("no-such-model", np.zeros((1, 1, 28, 28), dtype=np.float32))
    assert err.value.status == 404 and "no-such-model" in err.value.detail


def test_gate_exit_codes(server, folder, capsys):  # noqa: F811
    base, _, _ = server
    npz = folder.parent / "batch.npz"
    # threshold 0 flags every input: 10 flagged, none tolerated -> exit 1
    assert main(["gate", str(folder), str(npz), "--url", base, "--threshold", "0"]) == 1
    out = capsys.readouterr().out
    assert "screened 10 inputs with lenet5: 10 adversarial" in out
    assert main(["gate", str(folder), "--url", base, "--threshold", "0", "--max-adversarial", "6"]) == 0
    assert main(["gate", str(folder), "--url", base, "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_gate_reports_unreachable_server_and_empty_input(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    assert main(["gate", str(tmp_path / "empty-dir-missing"), "--url", "http://127.0.0.1:9"]) == 2
    assert main(["gate", str(tmp_path / "a.png"), "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach" in capsys.readouterr().err
