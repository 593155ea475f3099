"""A headless Chromium driven over the DevTools protocol, for tests that open a report.

The browser listens on 127.0.0.1 only, on a port it picks itself, and is stopped by its
process id. `open_page` loads one local file and records what the page did: console
errors, uncaught exceptions, log errors (such as Content-Security-Policy refusals) and
every network request other than the page itself and inline `data:` URLs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """Return the path of a Chromium executable, or None when none is installed."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageRecord:
    """What one page load did, and the values the test asked the page for."""

    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    evaluated: dict[str, object] = field(default_factory=dict)
    screenshot: bytes = b""


class Chromium:
    """A headless Chromium process with one page, driven over the DevTools websocket."""

    def __init__(self, executable: str, width: int = 1280, height: int = 900, timeout: float = 60.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="mmalign-chromium-")
        self.timeout = timeout
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.socket = None
        self.next_id = 0
        try:
            port = self._wait_for_port()
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            page = next(target for target in targets if target.get("type") == "page")
            self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        except Exception:
            self.close()
            raise

    def _wait_for_port(self) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.process.returncode} before it listened")
            if marker.is_file():
                lines = marker.read_text().splitlines()
                if lines and lines[0].isdigit():
                    return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium did not write {marker} within {self.timeout} s")

    def _send(self, method: str, params: dict | None = None, events: list | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to `events`."""
        self.next_id += 1
        command_id = self.next_id
        self.socket.send(json.dumps({"id": command_id, "method": method, "params": params or {}}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == command_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})
            if events is not None and "method" in message:
                events.append(message)

    def _drain(self, events: list, until: str | None, seconds: float) -> None:
        """Collect events until `until` arrives (if given), then for `seconds` more."""
        deadline = time.monotonic() + self.timeout
        while until is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {until} event within {self.timeout} s")
            message = json.loads(self.socket.recv())
            if "method" in message:
                events.append(message)
                if message["method"] == until:
                    break
        self.socket.settimeout(0.2)
        quiet_until = time.monotonic() + seconds
        try:
            while time.monotonic() < quiet_until:
                try:
                    message = json.loads(self.socket.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if "method" in message:
                    events.append(message)
        finally:
            self.socket.settimeout(self.timeout)

    def open_page(self, path: Path, expressions: dict[str, str] | None = None, settle: float = 1.0) -> PageRecord:
        """Load the local file `path`, let it settle, evaluate `expressions` and take a full-page screenshot."""
        events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self._send(f"{domain}.enable", events=events)
        url = Path(path).resolve().as_uri()
        self._send("Page.navigate", {"url": url}, events=events)
        if not any(event["method"] == "Page.loadEventFired" for event in events):
            self._drain(events, "Page.loadEventFired", settle)
        else:
            self._drain(events, None, settle)
        record = PageRecord()
        for name, expression in (expressions or {}).items():
            result = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, events=events)
            record.evaluated[name] = result.get("result", {}).get("value")
        shot = self._send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, events=events)
        record.screenshot = base64.b64decode(shot["data"])
        for event in events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                record.console_errors.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                record.console_errors.append(params.get("exceptionDetails", {}).get("text", "exception"))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                record.console_errors.append(params["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent":
                request_url = params.get("request", {}).get("url", "")
                if request_url != url and not request_url.startswith("data:"):
                    record.requests.append(request_url)
        return record

    def close(self) -> None:
        """Close the websocket, stop the browser by its process id and delete its profile."""
        if self.socket is not None:
            try:
                self.socket.close()
            except OSError:
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
