"""Run a real, headless ComfyUI server with this pack installed, and drive it over HTTP and /ws.

Standard library only (the test process runs in the project's venv, ComfyUI in its own; see
``comfy_env``). One :class:`ComfyServer` owns one ``main.py`` process on a free loopback port with
throw-away base/input/output/user/temp directories and database, the pack linked into its
``custom_nodes`` under a fixed folder name, and an ``extra_model_paths.yaml`` that points the
pack's model folders (and ComfyUI's ``checkpoints`` and ``vae_approx``) at a models directory of the
caller's choosing (tiny checkpoints in tests).
The process is always stopped by its own id (``stop()``, context manager, or at exit).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

PACK_FOLDER = "comfyui-diffuseit-blended"
# the pack's model folders, plus ComfyUI's own that the tiny models fill (core.tiny_sd: Load Checkpoint's
# checkpoints/tiny_sd15.safetensors, VAE Loader's vae_approx/taesd_*)
MODEL_FOLDERS = ("guided_diffusion", "dino", "clip_guidance", "lpips", "checkpoints", "vae_approx")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ServerError(RuntimeError):
    """The server did not start, died, or did not answer; the message carries the log tail."""


class PromptRejected(RuntimeError):
    """POST /prompt refused the prompt (validation); ``details`` is the server's JSON answer."""

    def __init__(self, message: str, details: Any):
        super().__init__(message)
        self.details = details


class ExecutionTimeout(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- a small ws client


class WebSocket:
    """The client side of RFC 6455 that ComfyUI's /ws needs: text and binary messages, ping/close."""

    MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed by the server")
            data += chunk
        head, self.buffer = data.split(b"\r\n\r\n", 1)
        status, *header_lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in status + " ":
            raise ConnectionError(f"websocket handshake refused: {status}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in header_lines)}
        accept = base64.b64encode(hashlib.sha1(key.encode() + self.MAGIC).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise ConnectionError("websocket handshake: wrong Sec-WebSocket-Accept")
        self.closed = False
        self._partial: Optional[tuple[int, bytearray]] = None

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def _frame(self) -> Optional[tuple[bool, int, bytes]]:
        buf = self.buffer
        if len(buf) < 2:
            return None
        fin, opcode, masked, n = buf[0] & 0x80, buf[0] & 0x0F, buf[1] & 0x80, buf[1] & 0x7F
        pos = 2
        if n in (126, 127):
            size = 2 if n == 126 else 8
            if len(buf) < pos + size:
                return None
            n = int.from_bytes(buf[pos:pos + size], "big")
            pos += size
        key = b""
        if masked:
            key, pos = buf[pos:pos + 4], pos + 4
        if len(buf) < pos + n:
            return None
        payload = buf[pos:pos + n]
        if masked:
            payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        self.buffer = buf[pos + n:]
        return bool(fin), opcode, payload

    def recv(self, timeout: float) -> Optional[tuple[int, bytes]]:
        """One whole message as (opcode, payload): 1 text, 2 binary, 8 close; None on timeout."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            frame = self._frame()
            if frame is None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    return None
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    self.closed = True
                    return None
                self.buffer += chunk
                continue
            fin, opcode, payload = frame
            if opcode == 0x9:
                self._send_frame(0xA, payload)
            elif opcode == 0x8:
                self.closed = True
                return 0x8, payload
            elif opcode == 0x0 and self._partial is not None:
                self._partial[1].extend(payload)
                if fin:
                    (op, data), self._partial = self._partial, None
                    return op, bytes(data)
            elif opcode in (0x1, 0x2):
                if fin:
                    return opcode, payload
                self._partial = (opcode, bytearray(payload))
        return None

    def close(self) -> None:
        try:
            if not self.closed:
                self._send_frame(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


# ----------------------------------------------------------------------------- results


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success", "error", "interrupted"
    seconds: float
    progress: list = field(default_factory=list)  # the "progress" events' data, in order
    previews: int = 0  # binary preview images received over /ws for this prompt
    executed: list = field(default_factory=list)  # node ids with an "executed" event
    cached: list = field(default_factory=list)  # node ids reported as cached
    error: Optional[dict] = None  # execution_error data
    history: dict = field(default_factory=dict)  # /history/<id> entry
    ws_finished: bool = False  # the run's last event (success / error / interrupted) came over /ws

    def progress_of(self, node_id: str) -> list:
        return [p for p in self.progress if str(p.get("node")) == str(node_id)]

    def output_images(self) -> list[dict]:
        """[{node, filename, subfolder, type}] of every image output in /history, in node order."""
        found = []
        for node_id, outputs in (self.history.get("outputs") or {}).items():
            for item in outputs.get("images") or []:
                if isinstance(item, dict) and "filename" in item:
                    found.append(dict(item, node=node_id))
        return found

    def describe_error(self) -> str:
        if not self.error:
            return self.status
        e = self.error
        trace = "".join(e.get("traceback") or [])
        return (f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: "
                f"{e.get('exception_message')}\n{trace}")


# ----------------------------------------------------------------------------- the server


class ComfyServer:
    def __init__(self, comfy_dir: os.PathLike, python: os.PathLike, pack_dir: os.PathLike, *,
                 models_dir: Optional[os.PathLike] = None, pack_folder: str = PACK_FOLDER,
                 workdir: Optional[os.PathLike] = None, extra_args: tuple = (), copy_pack: bool = False):
        self.comfy_dir, self.python, self.pack_dir = Path(comfy_dir), Path(python), Path(pack_dir).resolve()
        self.pack_folder = pack_folder
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="comfy-e2e-"))
        self.base = self.workdir / "base"
        self.input_dir, self.output_dir = self.base / "input", self.base / "output"
        self.user_dir, self.temp_dir = self.base / "user", self.base / "temp"
        self.models_dir = Path(models_dir) if models_dir else self.workdir / "models"
        self.log_path = self.workdir / "server.log"
        self.extra_args, self.copy_pack = tuple(extra_args), copy_pack
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex
        self.ws: Optional[WebSocket] = None
        self._object_info: Optional[dict] = None
        self._logf = None

    # -- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _layout(self) -> None:
        for d in (self.input_dir, self.output_dir, self.user_dir, self.temp_dir, self.base / "custom_nodes"):
            d.mkdir(parents=True, exist_ok=True)
        for folder in MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / self.pack_folder
        if not link.exists():
            if self.copy_pack:
                shutil.copytree(self.pack_dir, link, ignore=shutil.ignore_patterns(
                    ".git", ".venv", "__pycache__", "*.egg-info", "tests", "bench", ".pytest_cache"))
            else:
                os.symlink(self.pack_dir, link, target_is_directory=True)
        # the way users point ComfyUI at model folders elsewhere; the pack must keep these paths
        lines = ["diffuseit_e2e:", f"    base_path: {json.dumps(str(self.models_dir))}"]
        lines += [f"    {folder}: {folder}" for folder in MODEL_FOLDERS]
        (self.workdir / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [str(self.python), str(self.comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base),
                "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
                "--user-directory", str(self.user_dir), "--temp-directory", str(self.temp_dir),
                "--database-url", "sqlite:///" + str(self.user_dir / "comfyui.db"),
                "--extra-model-paths-config", str(self.workdir / "extra_model_paths.yaml"),
                "--disable-auto-launch", "--disable-api-nodes", *self.extra_args]

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self._layout()
        self.port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1")
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the server has its own interpreter
            env.pop(var, None)
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        atexit.register(self.stop)
        self.wait_ready(timeout)
        self.ws = WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}")
        # previews then arrive as type-4 frames that name their prompt
        self.ws.send_text(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        return self

    def wait_ready(self, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited during start-up (exit {self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as resp:
                    if resp.status == 200:
                        self.startup_seconds = time.monotonic() - t0
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None
        if self.proc is not None and self.proc.poll() is None:
            pgid = self.proc.pid  # start_new_session: the server leads its own process group
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
        if self._logf is not None:
            self._logf.close()
            self._logf = None

    def cleanup(self) -> None:
        self.stop()
        link = self.base / "custom_nodes" / self.pack_folder
        if link.is_symlink():  # never let a recursive delete of the work dir reach the pack itself
            link.unlink()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- log
    def log_text(self) -> str:
        try:
            return ANSI.sub("", self.log_path.read_bytes().decode("utf-8", "replace"))
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pack_import_errors(self) -> list[str]:
        """Tracebacks in the log that end in 'Cannot import ... <pack folder>', and IMPORT FAILED lines."""
        lines = self.log_text().splitlines()
        found = []
        for i, line in enumerate(lines):
            if self.pack_folder not in line and str(self.pack_dir) not in line:
                continue
            if "Cannot import" in line:
                start = i
                while start > 0 and "Traceback (most recent call last)" not in lines[start] and i - start < 300:
                    start -= 1
                found.append("\n".join(lines[start if "Traceback" in lines[start] else i:i + 1]))
            elif "IMPORT FAILED" in line:
                found.append(line.strip())
        return found

    # -- HTTP
    def request(self, path: str, payload: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        try:
            return status, json.loads(body.decode("utf-8", "replace"))
        except ValueError:
            return status, body.decode("utf-8", "replace")

    def request_bytes(self, path: str, timeout: float = 60.0) -> tuple[int, str, bytes]:
        """GET ``path`` as raw bytes (pictures): status, Content-Type, body."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.headers.get_content_type(), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get_content_type(), exc.read()

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            status, body = self.request("/object_info", timeout=120)
            if status != 200 or not isinstance(body, dict):
                raise ServerError(f"/object_info answered {status}")
            self._object_info = body
        return self._object_info

    def pack_nodes(self) -> dict:
        module = f"custom_nodes.{self.pack_folder}"
        return {name: info for name, info in self.object_info().items() if info.get("python_module") == module}

    def upload_input(self, name: str, data: bytes) -> Path:
        """Put a file into the server's input folder (what LoadImage lists)."""
        path = self.input_dir / name
        path.write_bytes(data)
        return path

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=60) as resp:
            return resp.read()

    def images(self, result: RunResult) -> list[bytes]:
        return [self.view(i["filename"], i.get("subfolder", ""), i.get("type", "output")) for i in result.output_images()]

    def interrupt(self) -> None:
        self.request("/interrupt", {})

    def history(self, prompt_id: str) -> Optional[dict]:
        status, body = self.request(f"/history/{prompt_id}")
        return body.get(prompt_id) if status == 200 and isinstance(body, dict) else None

    # -- prompts
    def submit(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its id, raises PromptRejected with the server's reasons."""
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise PromptRejected(f"POST /prompt -> {status}: {format_rejection(body)}", body)
        if body.get("node_errors"):
            raise PromptRejected(f"prompt queued with node errors: {format_rejection(body)}", body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0,
             on_progress: Optional[Callable[[dict], None]] = None) -> RunResult:
        """Follow one prompt over /ws until it succeeds, fails or is interrupted."""
        t0 = time.monotonic()
        result = RunResult(prompt_id=prompt_id, status="", seconds=0.0)
        last_poll = t0
        while not result.status:
            if time.monotonic() - t0 > timeout:
                self.interrupt()
                raise ExecutionTimeout(f"prompt {prompt_id} not finished after {timeout:.0f}s:\n{self.log_tail()}")
            if not self.alive():
                raise ServerError(f"ComfyUI died while running {prompt_id} (exit {self.proc.returncode}):\n"
                                  f"{self.log_tail()}")
            message = self.ws.recv(1.0) if self.ws is not None and not self.ws.closed else None
            if message is not None:
                self._handle(message, result, on_progress)
            elif self.ws is None or self.ws.closed:
                time.sleep(0.5)
            if not result.status and time.monotonic() - last_poll > 5:  # safety net if an event is missed
                last_poll = time.monotonic()
                entry = self.history(prompt_id)
                if entry and (entry.get("status") or {}).get("completed") is not None:
                    result.status = "success" if entry["status"].get("status_str") == "success" else "error"
                    self._drain(result, on_progress)
        result.seconds = time.monotonic() - t0
        for _ in range(40):
            entry = self.history(prompt_id)
            if entry is not None:
                result.history = entry
                break
            time.sleep(0.25)
        if result.status == "error" and result.error is None:
            for kind, data in (result.history.get("status") or {}).get("messages") or []:
                if kind == "execution_error":
                    result.error = data
                elif kind == "execution_interrupted":
                    result.status = "interrupted"
        return result

    def _drain(self, result: RunResult, on_progress, seconds: float = 10.0) -> None:
        """After /history says the run is over, read what /ws still has in flight (a loaded machine's
        server can record the result before it has sent the last progress events) up to the final event."""
        deadline = time.monotonic() + seconds
        while not result.ws_finished and time.monotonic() < deadline and self.ws is not None and not self.ws.closed:
            message = self.ws.recv(0.5)
            if message is not None:
                self._handle(message, result, on_progress)

    def _handle(self, message: tuple[int, bytes], result: RunResult, on_progress) -> None:
        opcode, payload = message
        if opcode == 0x2 and len(payload) >= 8:
            kind = struct.unpack(">I", payload[:4])[0]
            if kind == 4:  # PREVIEW_IMAGE_WITH_METADATA: [4][meta length][meta json][image]
                size = struct.unpack(">I", payload[4:8])[0]
                meta = json.loads(payload[8:8 + size] or b"{}")
                if meta.get("prompt_id") in (None, result.prompt_id):
                    result.previews += 1
            elif kind == 1:  # PREVIEW_IMAGE (clients without the metadata flag)
                result.previews += 1
            return
        if opcode != 0x1:
            return
        try:
            event = json.loads(payload)
        except ValueError:
            return
        kind, data = event.get("type"), event.get("data") or {}
        if not isinstance(data, dict) or data.get("prompt_id") not in (None, result.prompt_id):
            return
        if kind == "progress":
            result.progress.append(data)
            if on_progress is not None:
                on_progress(data)
        elif kind == "executed":
            result.executed.append(str(data.get("node")))
        elif kind == "execution_cached":
            result.cached.extend(str(n) for n in data.get("nodes") or [])
        elif kind == "execution_error":
            result.status, result.error, result.ws_finished = "error", data, True
        elif kind == "execution_interrupted":
            result.status, result.ws_finished = "interrupted", True
        elif kind == "execution_success":
            result.status, result.ws_finished = "success", True

    def run(self, prompt: dict, timeout: float = 300.0, on_progress=None) -> RunResult:
        return self.wait(self.submit(prompt), timeout, on_progress)


def format_rejection(body: Any) -> str:
    if not isinstance(body, dict):
        return str(body)[:2000]
    parts = []
    error = body.get("error")
    if isinstance(error, dict):
        parts.append(f"{error.get('type')}: {error.get('message')} {error.get('details', '')}".strip())
    for node_id, info in (body.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            parts.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')} - {err.get('details')}")
    return "; ".join(parts) or json.dumps(body)[:2000]
