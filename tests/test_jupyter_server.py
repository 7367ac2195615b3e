"""A notebook as JupyterLab runs it: through a real Jupyter server's kernel, started by a session on
``notebooks/04_analysis.ipynb`` (so the kernel's working directory is ``notebooks/``, as in JupyterLab), its
cells sent one by one over the kernel's websocket. papermill is not involved: this checks that the notebooks'
relative paths and imports work where users open them."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest
import yaml

from ofa_lib.paths import REPO_ROOT, data_dir
from ofa_lib.results import released

NOTEBOOK = "notebooks/04_analysis.ipynb"
TOKEN = uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, body: dict | None = None, method: str = "GET") -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
                             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={REPO_ROOT}",
                             *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI containers run as root
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    deadline = time.monotonic() + 60
    while True:
        try:
            _api(port, "/api/status")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"jupyter server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _run_cells(port: int, kernel_id: str, cells: list[str], timeout: float) -> list[str]:
    """Execute ``cells`` in order on the kernel; the text each printed; fails on the first error."""
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={TOKEN}")
    session, printed = uuid.uuid4().hex, []
    try:
        for code in cells:
            msg_id = uuid.uuid4().hex
            ws.write_message(json.dumps({
                "header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": "execute_request",
                           "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                            "allow_stdin": False, "stop_on_error": True}}))
            text = []
            while True:
                raw = await asyncio.wait_for(ws.read_message(), timeout)
                assert raw is not None, "the kernel's websocket closed"
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    text.append(content["text"])
                elif kind == "error":
                    pytest.fail(f"cell failed in the server's kernel: {content['ename']}: {content['evalue']}\n{code[:300]}")
                elif kind == "execute_reply":
                    break
            printed.append("".join(text))
    finally:
        ws.close()
    return printed


@pytest.mark.slow
def test_analysis_notebook_runs_in_a_jupyter_server_kernel_from_notebooks(server, tmp_path):
    try:
        if not (data_dir() / released.RELEASED_SUBDIR).is_dir():
            pytest.skip("released results not available")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    session = _api(server, "/api/sessions", {"path": NOTEBOOK, "type": "notebook", "name": "04_analysis.ipynb",
                                             "kernel": {"name": "python3"}}, method="POST")
    params = yaml.safe_load((REPO_ROOT / "params" / "reproduce_paper.yaml").read_text())
    params.update(outputs_root=str(tmp_path / "reports"), report_name="lab")
    nb = nbformat.read(REPO_ROOT / NOTEBOOK, as_version=4)
    cells = ["import os; print(os.getcwd())"]
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cells.append(cell.source)
        if "parameters" in cell.metadata.get("tags", []):  # what a user typing new values into it does
            cells.append("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    printed = asyncio.run(_run_cells(server, session["kernel"]["id"], cells, timeout=600))
    assert Path(printed[0].strip()) == REPO_ROOT / "notebooks"  # JupyterLab's working directory
    report = tmp_path / "reports" / "lab"
    assert (report / "table1.csv").is_file() and (report / "table2.csv").is_file()
    assert list(report.glob("*.png")), "no figure written"
