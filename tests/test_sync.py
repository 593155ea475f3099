"""Tests for `mmalign sync`: validation, argument building, and real transfers through a local sshd.

The sshd fixture starts OpenSSH's server on 127.0.0.1 with a throwaway host key and
authorized_keys under pytest's tmp directory. The client side uses its own known_hosts file
and identity, so strict host-key checking stays on and ~/.ssh is never read or written.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmalign.sync import build_rsync_command, classify_failure, register_cli, rsync_version, sync_run
from mmalign.sync_validate import (
    DEFAULT_SSH_OPTIONS,
    SyncError,
    SyncSettings,
    SyncValidationError,
    build_ssh_command,
    format_rsh_string,
    load_sync_settings,
    parse_host,
    parse_remote,
    validate_ssh_option,
)

SSHD = Path("/usr/sbin/sshd")
REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


@dataclass
class SshServer:
    """A running throwaway sshd and the client files that reach it."""

    port: int
    user: str
    identity: Path  # private key listed in the server's authorized_keys
    known_hosts: Path  # contains the server's host key

    @property
    def host(self) -> str:
        return f"{self.user}@127.0.0.1"

    def flags(self) -> list[str]:
        """CLI flags that reach this server with strict host-key checking on."""
        return ["--port", str(self.port), "--identity", str(self.identity), "--ssh-option", f"UserKnownHostsFile={self.known_hosts}"]

    def settings(self, **overrides) -> SyncSettings:
        values = {"port": self.port, "identity": self.identity, "ssh_options": [f"UserKnownHostsFile={self.known_hosts}"]}
        values.update(overrides)
        return SyncSettings(**values)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mmalign-test", "-f", str(path)], check=True)


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sshd exited with code {process.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"sshd did not listen on 127.0.0.1:{port} within {timeout} s: {log.read_text()}")


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory: pytest.TempPathFactory):
    if not SSHD.exists() or shutil.which("rsync") is None or shutil.which("ssh") is None:
        pytest.skip("needs openssh-server, openssh-client and rsync (scripts/setup.sh installs them)")
    base = tmp_path_factory.mktemp("sshd")
    _keygen(base / "host_key")
    _keygen(base / "client_key")
    shutil.copy(base / "client_key.pub", base / "authorized_keys")
    config = base / "sshd_config"
    config.write_text(
        textwrap.dedent(
            f"""\
            HostKey {base / "host_key"}
            AuthorizedKeysFile {base / "authorized_keys"}
            ListenAddress 127.0.0.1
            AddressFamily inet
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            UsePAM no
            StrictModes no
            PidFile none
            PrintMotd no
            """
        )
    )
    # sshd's privilege separation needs this directory; Debian creates it only when the service starts.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    checked = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True)
    if checked.returncode != 0:
        pytest.fail(f"sshd rejected the test config: {checked.stderr}")

    port = _free_port()
    log = base / "sshd.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config), "-p", str(port), "-o", "ListenAddress=127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, process, log)
        host_public_key = (base / "host_key.pub").read_text().split()
        known_hosts = base / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_public_key[0]} {host_public_key[1]}\n")
        yield SshServer(
            port=port,
            user=getpass.getuser(),
            identity=base / "client_key",
            known_hosts=known_hosts,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _make_run(root: Path, name: str = "demo") -> Path:
    run = root / name
    (run / "checkpoints" / "final").mkdir(parents=True)
    (run / "probes" / "layer_3").mkdir(parents=True)
    (run / "results.parquet").write_bytes(os.urandom(4096))
    (run / "report.html").write_text("<html><body>report</body></html>")
    (run / "manifest.json").write_text('{"name": "demo"}')
    (run / "config.yaml").write_text("name: demo\n")
    (run / "run.log").write_text("12:00:00 INFO mmalign: done\n")
    (run / "checkpoints" / "final" / "adapter.safetensors").write_bytes(os.urandom(65536))
    (run / "probes" / "layer_3" / "cfg.json").write_text("{}")
    return run


def _tree(root: Path) -> dict[str, str]:
    """Map each file's path relative to `root` to its sha256."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmalign")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


# Validation: no process starts for any of these.


@pytest.mark.parametrize(
    "spec",
    [
        "-oProxyCommand=touch /tmp/x:runs",
        "host;touch x:runs",
        "$(touch x):runs",
        "h`id`:runs",
        "host name:runs",
        "user@@host:runs",
        "-luser@host:runs",
        "us;er@host:runs",
        "host:runs;touch x",
        "host:$(touch x)",
        "host:`id`",
        "host:runs|cat",
        "host:runs&",
        "host:runs\nid",
        "host:runs\x00",
        "host:-e sh",
        "host:--rsh=sh",
        "host: runs",
        "host:'runs'",
        "host:runs/*",
        "host:~root/runs",
        "host::module",
        "rsync://host/module",
        "[::1:runs",
        "[not-an-ip]:runs",
        "999.1.1.1:runs",
        "host:",
        "runs",
    ],
)
def test_parse_remote_rejects_crafted_spec(spec: str) -> None:
    with pytest.raises(SyncValidationError):
        parse_remote(spec)


@pytest.mark.parametrize(
    ("spec", "user", "host", "path"),
    [
        ("gpu-01.lab.example:runs", None, "gpu-01.lab.example", "runs"),
        ("alice@gpu_box:/data/runs", "alice", "gpu_box", "/data/runs"),
        ("10.0.0.5:~/runs/demo", None, "10.0.0.5", "runs/demo"),
        ("bob@[::1]:/srv/runs", "bob", "::1", "/srv/runs"),
        ("host:~", None, "host", "."),
        ("host:runs/2024-05-01T12:00", None, "host", "runs/2024-05-01T12:00"),
    ],
)
def test_parse_remote_accepts_plain_spec(spec: str, user: str | None, host: str, path: str) -> None:
    target = parse_remote(spec)
    assert target.host.user == user
    assert target.host.host == host
    assert target.path == path


def test_parse_remote_uses_default_host() -> None:
    target = parse_remote("runs", default_host="alice@gpu")
    assert str(target) == "alice@gpu:runs"


def test_parse_host_formats_ipv6_with_brackets() -> None:
    assert str(parse_host("bob@[::1]")) == "bob@[::1]"


@pytest.mark.parametrize(
    "option",
    [
        "ProxyCommand=sh -c id",
        "proxycommand=nc host 22",
        "LocalCommand=id",
        "PermitLocalCommand=yes",
        "KnownHostsCommand=/bin/id",
        "RemoteCommand=id",
        "ProxyJump=bastion",
        "StrictHostKeyChecking=no",
        "ConnectTimeout 10",
        "ConnectTimeout=",
        "ConnectTimeout=10;id",
        "UserKnownHostsFile=/tmp/a b",
        "ServerAliveInterval=$(id)",
        "ForwardAgent=yes",
        "Compression=yes\nProxyCommand=id",
    ],
)
def test_validate_ssh_option_rejects_unsafe(option: str) -> None:
    with pytest.raises(SyncValidationError):
        validate_ssh_option(option)


def test_validate_ssh_option_normalizes_key_case() -> None:
    assert validate_ssh_option("connecttimeout=10") == "ConnectTimeout=10"


def test_settings_error_names_field_and_value(tmp_path: Path) -> None:
    config = tmp_path / "sync.yaml"
    config.write_text("sync:\n  port: 70000\n")
    with pytest.raises(SyncValidationError) as raised:
        load_sync_settings(config, {})
    assert "sync.port" in str(raised.value)
    assert "70000" in str(raised.value)


def test_settings_reject_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "sync.yaml"
    config.write_text("sync:\n  hostname: gpu\n")
    with pytest.raises(SyncValidationError) as raised:
        load_sync_settings(config, {})
    assert "sync.hostname" in str(raised.value)


def test_settings_reject_unknown_preset() -> None:
    with pytest.raises(SyncValidationError) as raised:
        load_sync_settings(None, {"only": ["results", "logs"]})
    assert "'logs'" in str(raised.value)


def test_settings_reject_command_option_in_file(tmp_path: Path) -> None:
    config = tmp_path / "sync.yaml"
    config.write_text("sync:\n  ssh_options: ['ProxyCommand=nc evil 22']\n")
    with pytest.raises(SyncValidationError) as raised:
        load_sync_settings(config, {})
    assert "ProxyCommand" in str(raised.value)


def test_settings_flags_override_file(tmp_path: Path) -> None:
    config = tmp_path / "sync.yaml"
    config.write_text("sync:\n  host: alice@gpu\n  port: 2222\n  exclude: ['*.bin']\n")
    settings = load_sync_settings(config, {"port": 2200, "exclude": None})
    assert settings.port == 2200
    assert settings.host == "alice@gpu"
    assert settings.exclude == ["*.bin"]


def test_settings_reject_missing_identity(tmp_path: Path) -> None:
    with pytest.raises(SyncValidationError) as raised:
        load_sync_settings(None, {"identity": tmp_path / "no_such_key"})
    assert "no_such_key" in str(raised.value)


@pytest.mark.parametrize("pattern", ["", "!", "- secret", "+ *", "a\nb"])
def test_settings_reject_bad_filter_pattern(pattern: str) -> None:
    with pytest.raises(SyncValidationError):
        load_sync_settings(None, {"include": [pattern]})


# Argument building.


def test_ssh_command_keeps_strict_host_key_checking(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("key")
    command = build_ssh_command("/usr/bin/ssh", SyncSettings(port=2222, identity=key, ssh_options=["ConnectTimeout=5"]))
    assert command[:5] == ["/usr/bin/ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
    assert command[command.index("-p") + 1] == "2222"
    assert command[command.index("-i") + 1] == str(key.resolve())
    # ssh keeps the first value per key, so the user's ConnectTimeout precedes the default.
    assert command.index("ConnectTimeout=5") < command.index(DEFAULT_SSH_OPTIONS[0])


def test_ssh_command_insecure_flag_turns_checking_off() -> None:
    command = build_ssh_command("ssh", SyncSettings(insecure_no_host_key_check=True))
    assert "StrictHostKeyChecking=no" in command
    assert "StrictHostKeyChecking=yes" not in command
    assert "UserKnownHostsFile=/dev/null" in command


def test_rsh_string_quotes_for_rsync_splitting() -> None:
    assert format_rsh_string(["ssh", "-i", "/keys/it's key"]) == "ssh -i '/keys/it''s key'"


def test_rsync_command_protects_args(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    command = build_rsync_command("push", run, parse_remote("gpu:runs"), SyncSettings(), version=(3, 2, 7))
    assert "--secluded-args" in command
    assert "--partial-dir=.rsync-partial" in command
    assert command[-3:] == ["--", f"{run}/", "gpu:runs/demo/"]
    old = build_rsync_command("push", run, parse_remote("gpu:runs"), SyncSettings(), version=(3, 1, 3))
    assert "--protect-args" in old


def test_rsync_command_orders_filters(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    settings = SyncSettings(only=["results", "reports"], exclude=["run.log"])
    command = build_rsync_command("pull", tmp_path / "local", parse_remote("gpu:runs/demo"), settings)
    filters = [arg for arg in command if arg.startswith(("--include", "--exclude"))]
    assert filters[:2] == ["--exclude=.rsync-partial/", "--exclude=run.log"]
    assert filters[2] == "--include=*/"
    assert "--include=results.parquet" in filters
    assert "--include=*.html" in filters
    assert filters[-1] == "--exclude=*"
    assert "--prune-empty-dirs" in command
    assert command[-2:] == ["gpu:runs/demo/", f"{tmp_path / 'local' / 'demo'}/"]


def test_rsync_version_is_parsed() -> None:
    rsync = shutil.which("rsync")
    if rsync is None:
        pytest.skip("rsync not installed")
    assert rsync_version(rsync) >= (3, 1, 0)


@pytest.mark.parametrize(
    ("direction", "returncode", "stderr", "expected"),
    [
        ("push", 23, ['rsync: [Receiver] mkdir "/srv/runs/demo" failed: Permission denied (13)'], "exit code 23"),
        ("push", 127, ["bash: line 1: rsync: command not found"], "rsync is not installed on gpu"),
        ("pull", 20, ["rsync error: received SIGINT, SIGTERM, or SIGHUP (code 20) at rsync.c(713) [Receiver=3.5.0]"], "was interrupted"),
        ("pull", 255, ["ssh: Could not resolve hostname gpu: Name or service not known"], "cannot reach gpu: Could not resolve hostname gpu"),
        ("pull", 12, ["Timeout, server gpu not responding.", "rsync: connection unexpectedly closed"], "connection to gpu was lost"),
        ("pull", 23, ['rsync: [generator] link_stat "/local/x" failed: No such file or directory (2)'], "exit code 23"),
    ],
)
def test_classify_failure_maps_stderr(direction: str, returncode: int, stderr: list[str], expected: str) -> None:
    error = classify_failure(returncode, stderr, direction, parse_remote("gpu:/srv/runs/demo"), SyncSettings())
    assert expected in str(error)


def test_missing_rsync_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SyncError, match="rsync not found on PATH"):
        sync_run("push", _make_run(tmp_path), parse_remote("gpu:runs"), SyncSettings())


def test_missing_ssh_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rsync = shutil.which("rsync")
    if rsync is None:
        pytest.skip("rsync not installed")
    only_rsync = tmp_path / "bin"
    only_rsync.mkdir()
    (only_rsync / "rsync").symlink_to(rsync)
    monkeypatch.setenv("PATH", str(only_rsync))
    with pytest.raises(SyncError, match="ssh not found on PATH"):
        sync_run("push", _make_run(tmp_path), parse_remote("gpu:runs"), SyncSettings())


def test_cli_rejects_injection_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _make_run(tmp_path)
    marker = tmp_path / "injected"
    code = _cli(["sync", "push", str(run), "--", f"127.0.0.1:/tmp;touch {marker}"])
    assert code == 2
    assert not marker.exists()
    assert "invalid remote path" in capsys.readouterr().err


def test_cli_rejects_command_ssh_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _make_run(tmp_path)
    marker = tmp_path / "injected"
    code = _cli(["sync", "push", str(run), "127.0.0.1:runs", "--ssh-option", f"ProxyCommand=touch {marker}"])
    assert code == 2
    assert not marker.exists()
    assert "ProxyCommand" in capsys.readouterr().err


# Real transfers through the local sshd.


def test_push_and_pull_round_trip(ssh_server: SshServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _make_run(tmp_path / "local")
    remote = tmp_path / "remote"
    remote.mkdir()

    assert _cli(["sync", "push", str(run), f"{ssh_server.host}:{remote}", *ssh_server.flags()]) == 0
    assert _tree(remote / "demo") == _tree(run)
    output = capsys.readouterr().out
    assert "<f+++++++++ results.parquet" in output
    assert "pushed 7 files" in output

    pulled = tmp_path / "pulled"
    assert _cli(["sync", "pull", f"{ssh_server.host}:{remote / 'demo'}", str(pulled), *ssh_server.flags()]) == 0
    assert _tree(pulled / "demo") == _tree(run)
    assert ">f+++++++++ report.html" in capsys.readouterr().out

    assert _cli(["sync", "push", str(run), f"{ssh_server.host}:{remote}", *ssh_server.flags()]) == 0
    assert "nothing to push" in capsys.readouterr().out


def test_push_only_results_and_reports(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "local")
    remote = tmp_path / "remote"
    remote.mkdir()
    code = _cli(["sync", "push", str(run), f"{ssh_server.host}:{remote}", "--only", "results,reports", *ssh_server.flags()])
    assert code == 0
    assert sorted(_tree(remote / "demo")) == ["config.yaml", "manifest.json", "report.html", "results.parquet", "run.log"]
    assert not (remote / "demo" / "checkpoints").exists()


def test_push_skips_leftover_partial_dir(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "local")
    leftover = run / ".rsync-partial"
    leftover.mkdir()
    (leftover / "report.html").write_text("<html>half")
    remote = tmp_path / "remote"
    remote.mkdir()
    result = sync_run("push", run, parse_remote(f"{ssh_server.host}:{remote}"), ssh_server.settings(only=["reports"]))
    assert result.files_moved == ["report.html"]
    assert not (remote / "demo" / ".rsync-partial").exists()


def test_pull_with_exclude_skips_checkpoints(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "remote")
    pulled = tmp_path / "pulled"
    code = _cli(["sync", "pull", f"{ssh_server.host}:{run}", str(pulled), "--exclude", "checkpoints/", *ssh_server.flags()])
    assert code == 0
    expected = {path: digest for path, digest in _tree(run).items() if not path.startswith("checkpoints/")}
    assert _tree(pulled / "demo") == expected


def test_dry_run_lists_files_and_moves_nothing(ssh_server: SshServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _make_run(tmp_path / "local")
    remote = tmp_path / "remote"
    remote.mkdir()
    code = _cli(["sync", "push", str(run), f"{ssh_server.host}:{remote}", "--dry-run", "--only", "reports", *ssh_server.flags()])
    assert code == 0
    output = capsys.readouterr().out.splitlines()
    assert "report.html" in output
    assert "results.parquet" not in output
    assert output[-1].startswith("dry run: 1 file")
    assert list(remote.iterdir()) == []


def test_dry_run_pull_creates_nothing(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "remote")
    pulled = tmp_path / "pulled"
    result = sync_run("pull", pulled, parse_remote(f"{ssh_server.host}:{run}"), ssh_server.settings(), dry_run=True)
    assert sorted(result.files_moved) == sorted(_tree(run))
    assert result.stats["Total transferred file size"] == sum(path.stat().st_size for path in run.rglob("*") if path.is_file())
    assert not pulled.exists()


def test_config_file_supplies_host_and_key(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "local")
    remote = tmp_path / "remote"
    remote.mkdir()
    config = tmp_path / "sync.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            sync:
              host: {ssh_server.host}
              port: 1
              identity: {ssh_server.identity}
              ssh_options: ["UserKnownHostsFile={ssh_server.known_hosts}", "ConnectTimeout=5"]
              only: [reports]
            """
        )
    )
    # The file's port is wrong on purpose: the --port flag must win.
    assert _cli(["sync", "push", str(run), str(remote), "--config", str(config), "--port", str(ssh_server.port)]) == 0
    assert sorted(_tree(remote / "demo")) == ["report.html"]


def test_identity_path_with_space_and_quote(ssh_server: SshServer, tmp_path: Path) -> None:
    key_dir = tmp_path / "key dir"
    key_dir.mkdir()
    identity = key_dir / "it's key"
    shutil.copy(ssh_server.identity, identity)
    identity.chmod(0o600)
    run = _make_run(tmp_path / "local")
    remote = tmp_path / "remote"
    remote.mkdir()
    settings = ssh_server.settings(identity=identity)
    result = sync_run("push", run, parse_remote(f"{ssh_server.host}:{remote}"), settings)
    assert len(result.files_moved) == 7
    assert _tree(remote / "demo") == _tree(run)


def test_progress_lines_are_reported(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "local")
    remote = tmp_path / "remote"
    remote.mkdir()
    lines: list[str] = []
    sync_run("push", run, parse_remote(f"{ssh_server.host}:{remote}"), ssh_server.settings(), progress=True, on_progress=lines.append)
    assert lines
    assert lines[-1].split()[1] == "100%"


def test_remote_path_not_found_on_pull(ssh_server: SshServer, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(SyncError) as raised:
        sync_run("pull", tmp_path / "pulled", parse_remote(f"{ssh_server.host}:{missing}"), ssh_server.settings())
    message = str(raised.value)
    assert f"remote path '{missing}' not found" in message
    assert "127.0.0.1" in message


def test_remote_directory_not_found_on_push(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "local")
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(SyncError) as raised:
        sync_run("push", run, parse_remote(f"{ssh_server.host}:{missing}"), ssh_server.settings())
    assert f"remote directory '{missing}' not found" in str(raised.value)
    assert "mkdir -p" in str(raised.value)


def test_refused_key_is_reported(ssh_server: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    _keygen(stranger)
    run = _make_run(tmp_path / "local")
    with pytest.raises(SyncError) as raised:
        sync_run("push", run, parse_remote(f"{ssh_server.host}:{tmp_path}"), ssh_server.settings(identity=stranger))
    message = str(raised.value)
    assert "rejected the SSH key" in message
    assert str(stranger) in message


def test_unreachable_host_is_reported(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "local")
    closed_port = _free_port()
    with pytest.raises(SyncError) as raised:
        sync_run("push", run, parse_remote(f"{ssh_server.host}:{tmp_path}"), ssh_server.settings(port=closed_port))
    message = str(raised.value)
    assert f"cannot reach {ssh_server.host} port {closed_port}" in message
    assert "Connection refused" in message


def test_unknown_host_key_fails_unless_insecure(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "local")
    remote = tmp_path / "remote"
    remote.mkdir()
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    settings = ssh_server.settings(ssh_options=[f"UserKnownHostsFile={empty_known_hosts}"])
    with pytest.raises(SyncError) as raised:
        sync_run("push", run, parse_remote(f"{ssh_server.host}:{remote}"), settings)
    assert "host key verification failed" in str(raised.value)
    assert "--insecure-no-host-key-check" in str(raised.value)
    assert not (remote / "demo").exists()
    assert empty_known_hosts.read_text() == ""

    insecure = ssh_server.settings(ssh_options=[f"UserKnownHostsFile={empty_known_hosts}"], insecure_no_host_key_check=True)
    sync_run("push", run, parse_remote(f"{ssh_server.host}:{remote}"), insecure)
    assert _tree(remote / "demo") == _tree(run)
    assert empty_known_hosts.read_text() == ""


def test_changed_host_key_is_reported(ssh_server: SshServer, tmp_path: Path) -> None:
    other_key = tmp_path / "other_host_key"
    _keygen(other_key)
    key_type, key_data = other_key.with_suffix(".pub").read_text().split()[:2]
    wrong_known_hosts = tmp_path / "known_hosts"
    wrong_known_hosts.write_text(f"[127.0.0.1]:{ssh_server.port} {key_type} {key_data}\n")
    settings = ssh_server.settings(ssh_options=[f"UserKnownHostsFile={wrong_known_hosts}"])
    with pytest.raises(SyncError) as raised:
        sync_run("push", _make_run(tmp_path / "local"), parse_remote(f"{ssh_server.host}:{tmp_path}"), settings)
    assert "ssh-keygen -R" in str(raised.value)


_CLI_SCRIPT = """
import argparse, sys
from mmalign.sync import register_cli
parser = argparse.ArgumentParser(prog="mmalign")
register_cli(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def test_interrupted_push_resumes_on_rerun(ssh_server: SshServer, tmp_path: Path) -> None:
    run = _make_run(tmp_path / "local")
    big = run / "checkpoints" / "final" / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    remote = tmp_path / "remote"
    remote.mkdir()
    argv = [sys.executable, "-c", _CLI_SCRIPT, "sync", "push", str(run), f"{ssh_server.host}:{remote}", *ssh_server.flags()]

    # 1. Start a slow push in its own process group and kill the group once big.bin is partly sent.
    slow = subprocess.Popen([*argv, "--bwlimit", "2000"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    receiving_dir = remote / "demo" / "checkpoints" / "final"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        temporary = [path for path in receiving_dir.glob(".big.bin.*")] if receiving_dir.is_dir() else []
        if temporary and temporary[0].stat().st_size > 1024 * 1024:
            break
        time.sleep(0.05)
    else:
        os.killpg(slow.pid, signal.SIGKILL)
        pytest.fail(f"the slow push never wrote 1 MiB of big.bin: {slow.communicate()[0]!r}")
    os.killpg(slow.pid, signal.SIGTERM)
    slow.communicate(timeout=30)
    assert slow.returncode != 0

    # 2. The remote rsync notices the dropped connection and keeps the partial file.
    partial = receiving_dir / ".rsync-partial" / "big.bin"
    deadline = time.monotonic() + 15
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.exists()
    assert 0 < partial.stat().st_size < big.stat().st_size
    assert not (receiving_dir / "big.bin").exists()

    # 3. The rerun without a limit reuses the partial data and ends with identical files.
    rerun = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _tree(remote / "demo") == _tree(run)
    assert not partial.parent.exists()
    summary = rerun.stdout.strip().splitlines()[-1]
    assert "reused from existing or partially transferred files" in summary
