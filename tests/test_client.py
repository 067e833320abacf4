"""The pipeline client and `fisher-guard gate` against a real server process (the e2e fixture's uvicorn): the
client-only distribution (client/, fisher_guard_client) with the engine unimportable, the CLI's parsers built
without torch, and gate's output into a pipe whose reader leaves early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from fisher_guard_client import FisherGuardClient, FisherGuardError
from fisher_guard_client.console import CLOSED_PIPE_EXIT
from test_e2e import digits, png, server  # noqa: F401  (fixtures shared with the end-to-end tests)

from service.cli import main

REPO = Path(__file__).resolve().parent.parent
ENGINE = ("torch", "torchvision", "sklearn", "scipy", "numpy")  # what a parser or the client-only install must not load

# Runs `fisher-guard-gate ARGS` in a fresh interpreter where the engine cannot be imported: a meta-path finder ahead
# of every other refuses torch, torchvision, sklearn, scipy, numpy and the main package (service) itself.
WITHOUT_ENGINE = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class NoEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}}: not installed (client-only)")
sys.meta_path.insert(0, NoEngine())
from fisher_guard_client.gate import main
status = main(sys.argv[1:])
assert not [m for m in sys.modules if m.partition(".")[0] in BLOCKED], "an engine module was loaded"
sys.exit(status)
""".format(blocked=(*ENGINE, "service"))


def gate_without_engine(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_ENGINE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


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


def test_parsers_import_no_engine() -> None:
    """Building the whole CLI parser (every command's --help text included) and importing the gate command load
    no torch, torchvision, sklearn, scipy or numpy: a fresh interpreter, its sys.modules inspected."""
    script = ("import json, sys\n"
              "import fisher_guard_client.gate\n"
              "from service.cli import build_parser\n"
              "parser = build_parser()\n"
              "commands = next(a for a in parser._actions if hasattr(a, 'choices') and a.choices).choices\n"
              "texts = [p.format_help() for p in commands.values()]\n"
              "print(json.dumps({'commands': sorted(commands), 'modules': sorted(sys.modules)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    assert {"gate", "train-model", "train-detector", "serve", "worker", "jobs"} <= set(seen["commands"])
    loaded = sorted({m.partition(".")[0] for m in seen["modules"]} & set(ENGINE))
    assert not loaded, f"building the CLI parser imported {loaded}: import them in the command's handler"


def test_client_only_gate_screens_a_png_without_the_engine(server, folder, tmp_path):  # noqa: F811
    """fisher-guard-gate with torch, sklearn, numpy and the service package unimportable gives the server's own
    verdict for a PNG (the reference: the same upload by hand with httpx)."""
    base, _, _ = server
    image = folder / "00.png"
    proc = gate_without_engine(str(image), "--url", base, "--json", cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    direct = httpx.post(f"{base}/v1/models/lenet5/screen/upload", timeout=60,
                        files={"files": (image.name, image.read_bytes(), "image/png")}).json()["results"][0]
    (result,) = report["results"]
    assert result["input"] == str(image) and report["screened"] == 1
    for key in ("prediction", "adversarial", "score", "eigenvalues"):
        assert result[key] == direct[key], key
    assert proc.returncode == (1 if direct["adversarial"] else 0)


def test_client_only_gate_says_arrays_need_numpy(tmp_path):
    np.save(tmp_path / "batch.npy", np.zeros((2, 1, 28, 28), dtype=np.float32))
    proc = gate_without_engine(str(tmp_path / "batch.npy"), "--url", "http://127.0.0.1:9", cwd=tmp_path)
    assert proc.returncode == 2
    assert "needs numpy: pip install 'fisher-guard-client[arrays]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gate_into_a_closed_pipe_exits_quietly(server, folder):  # noqa: F811
    """The reader is gone before gate writes (the read end closed first): no traceback, status 141."""
    base, _, _ = server
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "fisher_guard_client", str(folder), "--url", base, "--json"],
                              cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr == ""
    assert proc.returncode == CLOSED_PIPE_EXIT


def test_gate_json_into_head_ends_quietly(server, digits, tmp_path):  # noqa: F811
    """`fisher-guard gate --json ... | head -c 10` in bash with pipefail: more JSON than a pipe holds (256 results),
    head leaves after 10 bytes; the pipeline's status is gate's 141 (a gate that finished writing would give 1:
    --threshold 0 flags everything) and stderr stays empty."""
    images, _ = digits
    batch = tmp_path / "many.npz"
    np.savez(batch, images=np.tile(images, (16, 1, 1, 1)))
    base, _, _ = server
    gate = f"{sys.executable} -m service.cli gate {batch} --url {base} --threshold 0 --json"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {gate} | head -c 10"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout == '{\n  "scree'
    assert proc.stderr == ""
    assert proc.returncode == CLOSED_PIPE_EXIT
