"""The package installs like a library (issue 15): build the wheel from a
copy of the checkout, install it into a fresh virtualenv, and splice
through it, hash-checked, on each backend this process may load, from a
directory far from the checkout (so only the installed files are used).

Offline: the wheel is built with the test venv's setuptools
(--no-build-isolation) and installed with --no-index --no-deps (the
dependencies are the test venv's business; bcc comes from the system
site-packages, as `make setup` arranges).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run by the installed interpreter: everything it reports is about the
# installed package.
PROBE = r"""
import hashlib, json, os, random, socket, sys, threading
import sosplice
from importlib import resources

out = {"file": sosplice.__file__, "version": sosplice.__version__,
       "typed": resources.files("sosplice").joinpath("py.typed").is_file(),
       "bpf_sources": sorted(p.name for p in resources.files("sosplice").joinpath("bpf").iterdir()),
       "spliced": {}, "refused": {}}
auto = sosplice.Splicer(backend="auto")
out["auto"] = [auto.backend, auto.fallback]
auto.close()

def pair():
    ls = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(ls.getsockname())
    b = ls.accept()[0]
    ls.close()
    return a, b

for backend in ("bpf", "worker"):
    try:
        eng = sosplice.Splicer(backend=backend)
    except OSError as e:
        out["refused"][backend] = e.errno
        continue
    with eng:
        (c, p1), (p2, u) = pair(), pair()          # client<->p1 spliced to p2<->upstream
        eng.splice(p1, p2)
        data = random.Random(backend).randbytes(8 << 20)
        t = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
        t.start()
        h, n = hashlib.sha256(), 0
        u.settimeout(30)
        while n < len(data) and (d := u.recv(1 << 16)):
            h.update(d)
            n += len(d)
        t.join()
        out["spliced"][backend] = [n, h.hexdigest() == hashlib.sha256(data).hexdigest()]
        for s in (c, p1, p2, u):
            s.close()
print(json.dumps(out))
"""


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not (_have("setuptools") and _have("wheel")),
                    reason="building the wheel offline needs setuptools and wheel in the "
                           "test venv (make setup)")
def test_wheel_installs_into_a_fresh_venv_and_splices(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # A copy: building writes build/ and *.egg-info next to pyproject.toml.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("loader", "bpf", "splicectl"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "SOSPLICE_BPF_DIR", "SOSPLICE_BACKEND", "PIP_INDEX_URL")}
    env.update(SOSPLICE_RUN_DIR=str(tmp_path / "run"), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONDONTWRITEBYTECODE="1")

    def run(*cmd: str, cwd: Path = tmp_path) -> str:
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", str(tmp_path / "dist"), str(src))
    wheels = list((tmp_path / "dist").glob("sosplice-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv))
    py = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
        "--no-index", str(wheels[0]))
    got = json.loads(run(str(py), "-c", PROBE))

    import sosplice
    assert got["file"].startswith(str(venv)), got["file"]       # the wheel, not the checkout
    assert got["version"] == sosplice.__version__
    assert got["typed"] is True
    assert got["bpf_sources"] == sorted(p.name for p in (ROOT / "bpf").iterdir())
    # Every backend either spliced every byte or was refused for want of
    # privilege; auto is bpf exactly when bpf loads, else worker with a reason.
    assert got["spliced"]["worker"] == [8 << 20, True], got
    if "bpf" in got["spliced"]:
        assert got["spliced"]["bpf"] == [8 << 20, True], got
        assert got["auto"] == ["bpf", ""], got
    else:
        assert os.geteuid() != 0, f"bpf refused as root from the installed package: {got}"
        assert got["auto"][0] == "worker" and got["auto"][1].startswith("bpf: E"), got
    assert run(str(venv / "bin" / "splicectl"), "--version").strip() == \
        f"splicectl {sosplice.__version__}"
