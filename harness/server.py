"""Starts and stops a headless ComfyUI server for the demo and the end-to-end tests (stdlib only).

Everything the server reads or writes lives in one run folder (default `.host/run`):

    models/{checkpoints,edlora,controlnet}/  custom_nodes/ComfyUI-MixOfShow -> this repo
    output/  input/  temp/  user/  extra_model_paths.yaml  server.log  server.pid  server.url

The host is the embedded ComfyUI copy (`python harness/host.py setup`) or the checkout named
by MIXOFSHOW_COMFYUI (see harness/host.py). CLI:

    python harness/server.py start [--run-dir D] [--port N] [--cpu | --no-cpu]   # prints the URL
    python harness/server.py status [--run-dir D]
    python harness/server.py stop [--run-dir D]
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / ".host" / "run"  # == harness.host.RUN_DIR
PLUGIN_LINK_NAME = "ComfyUI-MixOfShow"
MODEL_FOLDERS = {"checkpoints": "models/checkpoints", "edlora": "models/edlora",
                 "controlnet": "models/controlnet", "loras": "models/loras", "embeddings": "models/embeddings"}


try:
    from . import host as _host
except ImportError:  # run as a script: harness/ is sys.path[0]
    import host as _host


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path, lines=60):
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


class ComfyError(RuntimeError):
    """A prompt the server rejected (HTTP 400) or that failed while executing."""

    def __init__(self, message, details=None):
        super().__init__(message)
        self.details = details or {}


def is_transient(error):
    """A socket timeout or a dropped connection (a busy server), not a refusal or an HTTP error."""
    if isinstance(error, urllib.error.HTTPError):
        return False
    if isinstance(error, urllib.error.URLError):
        error = error.reason
    return isinstance(error, (TimeoutError, ConnectionResetError, ConnectionAbortedError))


class ComfyClient:
    """A small client for ComfyUI's HTTP API (both the 2024 host and current ComfyUI). Reads (GET)
    are retried `retries` times after a transient error; POSTs are not (a prompt must not run twice)."""

    def __init__(self, url, timeout=30, retries=3):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.client_id = uuid.uuid4().hex

    def _request(self, path, data=None, method=None):
        body = None if data is None else json.dumps(data).encode()
        attempts = 1 if body is not None or method not in (None, "GET") else 1 + self.retries
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(self.url + path, data=body, method=method,
                                             headers={"Content-Type": "application/json"} if body else {})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except (urllib.error.URLError, OSError) as e:
                if attempt == attempts or not is_transient(e):
                    raise
                time.sleep(attempt)

    def get_json(self, path):
        return json.loads(self._request(path))

    def system_stats(self):
        return self.get_json("/system_stats")

    def object_info(self, node_class=None):
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    def queue(self, prompt, extra_data=None):
        """POSTs an API-format prompt; returns its prompt_id. Raises ComfyError with the
        server's `error` and `node_errors` when validation rejects it (HTTP 400)."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            answer = json.loads(self._request("/prompt", payload))
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                answer = json.loads(text)
            except ValueError:
                raise ComfyError(f"POST /prompt: HTTP {e.code}: {text[:2000]}") from None
            raise ComfyError(f"POST /prompt rejected (HTTP {e.code}): {format_validation_error(answer)}",
                             answer) from None
        return answer["prompt_id"]

    def history(self, prompt_id=None):
        return self.get_json("/history" + (f"/{prompt_id}" if prompt_id else ""))

    def wait(self, prompt_id, timeout=300, poll=0.1):
        """Polls /history/<id> until the prompt finished; returns its history entry.
        Raises ComfyError with the execution error messages when it failed."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id).get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str", "success") != "success" or status.get("completed") is False:
                    raise ComfyError(f"prompt {prompt_id} failed: {execution_errors(entry) or status}", entry)
                return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")
            time.sleep(poll)

    def run(self, prompt, timeout=300):
        """queue() + wait(); returns the history entry."""
        return self.wait(self.queue(prompt), timeout)

    def view(self, filename, subfolder="", type="output"):
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._request("/view?" + query)

    def images(self, entry, node_id=None):
        """[(image info dict, PNG bytes)] for every image in a history entry's outputs (of node_id's only,
        if given)."""
        outputs = entry.get("outputs", {})
        out = []
        for node_output in (outputs.values() if node_id is None else [outputs.get(node_id, {})]):
            for image in node_output.get("images", []):
                out.append((image, self.view(image["filename"], image.get("subfolder", ""),
                                             image.get("type", "output"))))
        return out

    def interrupt(self):
        self._request("/interrupt", {}, method="POST")

    def upload_image(self, path, overwrite=True):
        """POSTs an image file to /upload/image (into the input folder, as the UI's upload button
        does); returns the name a LoadImage node refers to it by."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        fields = [f'Content-Disposition: form-data; name="overwrite"\r\n\r\n{str(overwrite).lower()}'.encode(),
                  f'Content-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                  f'Content-Type: application/octet-stream\r\n\r\n'.encode() + path.read_bytes()]
        body = b"".join(b"--" + boundary.encode() + b"\r\n" + field + b"\r\n" for field in fields)
        request = urllib.request.Request(self.url + "/upload/image", data=body + f"--{boundary}--\r\n".encode(),
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            answer = json.loads(response.read())
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


def execution_errors(entry):
    """The execution_error messages of a history entry, as readable text."""
    lines = []
    for event, data in (entry.get("status") or {}).get("messages", []):
        if event == "execution_error":
            lines.append(f"node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}")
        elif event == "execution_interrupted":
            lines.append(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    return "\n".join(lines)


def format_validation_error(answer):
    error = answer.get("error")
    text = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    if isinstance(error, dict) and error.get("details"):
        text += f" ({error['details']})"
    for node_id, node_error in (answer.get("node_errors") or {}).items():
        for e in node_error.get("errors", []):
            text += f"\n  node {node_id} ({node_error.get('class_type')}): {e.get('message')}: {e.get('details')}"
    return text


class Server:
    """One ComfyUI server process, controlled through the PID file in its run folder."""

    def __init__(self, run_dir=None, host_dir=None, port=None, cpu=True, extra_args=()):
        self.run_dir = Path(run_dir or RUN_DIR).resolve()
        self.host_dir = Path(host_dir or _host.host_dir()).resolve()
        self.port = port
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.process = None
        self.log_path = self.run_dir / "server.log"
        self.pid_path = self.run_dir / "server.pid"
        self.url_path = self.run_dir / "server.url"

    # -- run folder -------------------------------------------------------------------------
    def models_dir(self, folder="checkpoints"):
        return self.run_dir / MODEL_FOLDERS.get(folder, f"models/{folder}")

    def prepare(self):
        """Creates the run folder, its extra_model_paths.yaml and the plugin link."""
        if not (self.host_dir / "main.py").is_file():
            raise SystemExit(f"no ComfyUI at {self.host_dir}: run scripts/setup_env.sh "
                             f"(or point MIXOFSHOW_COMFYUI at a ComfyUI checkout)")
        for sub in ["custom_nodes", "output", "input", "temp", "user", *MODEL_FOLDERS.values()]:
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        user = self.host_dir / "user"
        if user.is_symlink():  # the embedded copy links user/ to .host/run/user
            os.makedirs(os.path.realpath(user), exist_ok=True)
        lines = ["mixofshow_harness:", f"  base_path: {json.dumps(str(self.run_dir))}"]
        lines += [f"  {name}: {path}" for name, path in MODEL_FOLDERS.items()]
        lines += ["  custom_nodes: custom_nodes", ""]
        (self.run_dir / "extra_model_paths.yaml").write_text("\n".join(lines))
        link = self.run_dir / "custom_nodes" / PLUGIN_LINK_NAME
        if link.is_symlink() and Path(os.readlink(link)) != ROOT:
            link.unlink()
        if not link.is_symlink():
            if link.exists():
                raise SystemExit(f"{link} exists and is not a link to {ROOT}")
            link.symlink_to(ROOT, target_is_directory=True)
        return self

    def command(self):
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch",
                "--output-directory", str(self.run_dir / "output"),
                "--input-directory", str(self.run_dir / "input"),
                "--temp-directory", str(self.run_dir),  # ComfyUI adds /temp (and wipes it)
                "--extra-model-paths-config", str(self.run_dir / "extra_model_paths.yaml")]
        if self._host_has_flag("--user-directory"):  # current ComfyUI; the 2024 host has none
            args += ["--user-directory", str(self.run_dir / "user")]
        if self.cpu:
            args.append("--cpu")
        return args + self.extra_args

    def _host_has_flag(self, flag):
        try:
            return flag in (self.host_dir / "comfy" / "cli_args.py").read_text()
        except OSError:
            return False

    # -- process ----------------------------------------------------------------------------
    def recorded_pid(self):
        try:
            pid = int(self.pid_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _is_our_server(pid) else None

    @property
    def url(self):
        if self.port is None and self.url_path.exists():
            return self.url_path.read_text().strip()
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout=30):
        return ComfyClient(self.url, timeout)

    def start(self, timeout=60, env=None):
        """Starts the server and waits until GET /system_stats answers; returns self."""
        self.prepare()
        running = self.recorded_pid()
        if running is not None:
            raise SystemExit(f"a server (pid {running}) already runs from {self.run_dir} at "
                             f"{self.url}; stop it first: python harness/server.py stop")
        self.port = self.port or free_port()
        log = open(self.log_path, "w")
        try:
            self.process = subprocess.Popen(self.command(), cwd=self.host_dir, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=dict(os.environ if env is None else env,
                                                     PYTHONUNBUFFERED="1"),
                                            start_new_session=True)
        finally:
            log.close()
        self.pid_path.write_text(f"{self.process.pid}\n")
        self.url_path.write_text(self.url + "\n")
        deadline = time.monotonic() + timeout
        client = ComfyClient(self.url, timeout=5)
        while True:
            if self.process.poll() is not None:
                self._forget()
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting; "
                                   f"{self.log_path}:\n{log_tail(self.log_path)}")
            try:
                client.system_stats()
                return self
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer /system_stats within {timeout} s; "
                                   f"{self.log_path}:\n{log_tail(self.log_path)}")
            time.sleep(0.2)

    def stop(self, grace=5.0):
        """SIGTERM, then SIGKILL after `grace` seconds. True when a server was running."""
        pid = self.process.pid if self.process is not None else self.recorded_pid()
        if pid is None:
            self._forget()
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self._wait_exit(pid, grace):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_exit(pid, 5.0)
        self._forget()
        return True

    def _wait_exit(self, pid, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.pid == pid:
                if self.process.poll() is not None:
                    return True
            elif not _is_our_server(pid):
                return True
            time.sleep(0.05)
        return False

    def _forget(self):
        for path in (self.pid_path, self.url_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()


def _is_our_server(pid):
    """True when `pid` is alive and is a ComfyUI main.py (guards against reused PIDs)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True  # no /proc: trust the PID file
    return state != b"Z" and b"main.py" in cmdline


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--run-dir", default=str(RUN_DIR))
    parser.add_argument("--port", type=int, default=None, help="default: a free port on 127.0.0.1")
    parser.add_argument("--timeout", type=float, default=60)
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--cpu", dest="cpu", action="store_true", default=None, help="pass --cpu to ComfyUI")
    device.add_argument("--no-cpu", dest="cpu", action="store_false",
                        help="let ComfyUI pick the device (default when torch sees CUDA)")
    args = parser.parse_args(argv)
    server = Server(args.run_dir, port=args.port)
    if args.action == "start":
        if args.cpu is None:
            import torch
            args.cpu = not torch.cuda.is_available()
        server.cpu = args.cpu
        server.start(args.timeout)
        print(f"ComfyUI running: pid {server.process.pid}, {server.url} (log {server.log_path})")
    elif args.action == "stop":
        print("stopped" if server.stop() else f"no server running from {server.run_dir}")
    else:
        pid = server.recorded_pid()
        if pid is None:
            print(f"no server running from {server.run_dir}")
            return 1
        print(f"running: pid {pid}, {server.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
