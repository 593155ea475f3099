"""Copy run directories between machines with rsync over SSH: `mmalign sync push|pull`.

Both directions copy the contents of a source directory into `DEST/NAME/`, where NAME is the
source directory's name, so `push runs/demo gpu:runs` writes `gpu:runs/demo/` and
`pull gpu:runs/demo runs` writes `runs/demo/`. rsync and ssh are started with argument lists
(never a shell), remote file names travel inside the rsync protocol (`--secluded-args`), and
ssh keeps strict host-key checking unless `insecure_no_host_key_check` is set. Interrupted
files stay in `.rsync-partial/` on the receiving side, and a rerun resumes from them.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import posixpath
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from mmalign.sync_validate import (
    FILTER_PRESETS,
    PARTIAL_DIR,
    RemoteHost,
    RemoteTarget,
    SyncError,
    SyncSettings,
    SyncValidationError,
    build_filter_args,
    build_ssh_command,
    format_rsh_string,
    load_sync_settings,
    parse_remote,
    validate_remote_path,
)

__all__ = ["SyncError", "SyncValidationError", "SyncResult", "ItemizedChange", "sync_run", "build_rsync_command", "register_cli"]

logger = logging.getLogger("mmalign.sync")

Direction = Literal["push", "pull"]

MIN_RSYNC_VERSION = (3, 1, 0)  # --info=progress2 first shipped in rsync 3.1.0

_ITEMIZED = re.compile(r"(?P<code>[<>ch.*][fdLDS].{9}) (?P<path>.+)")
_PROGRESS = re.compile(r"\s*[\d,.]+[KMGT]?B?\s+\d+%")
_STAT = re.compile(r"(?P<key>Number of [^:]+|Total [^:]+|Literal data|Matched data|File list size): (?P<value>[\d,.]+)")


@dataclass(frozen=True)
class ItemizedChange:
    """One line of rsync `--itemize-changes` output."""

    code: str  # e.g. '<f+++++++++' (file sent), '>f.st......' (file received and updated), 'cd+++++++++' (directory created)
    path: str  # relative to the source directory

    @property
    def moves_content(self) -> bool:
        """Whether file data is (or in a dry run would be) sent over the connection."""
        return self.code[0] in "<>"


@dataclass
class SyncResult:
    """Outcome of one push or pull: the changes rsync made, or would make in a dry run, and its --stats values."""

    direction: Direction
    source: str
    destination: str
    dry_run: bool
    changes: list[ItemizedChange] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)  # rsync --stats lines, e.g. "Literal data" -> bytes

    @property
    def files_moved(self) -> list[str]:
        """Paths of the files whose data moved, or would move in a dry run."""
        return [change.path for change in self.changes if change.moves_content]


def find_tools() -> tuple[str, str]:
    """Return the absolute paths of rsync and ssh.

    Raises:
        SyncError: when either is not on PATH.
    """
    rsync_path = shutil.which("rsync")
    if rsync_path is None:
        raise SyncError("rsync not found on PATH; install it (Debian/Ubuntu: apt-get install rsync, macOS: brew install rsync)")
    ssh_path = shutil.which("ssh")
    if ssh_path is None:
        raise SyncError("ssh not found on PATH; install the OpenSSH client (Debian/Ubuntu: apt-get install openssh-client)")
    return rsync_path, ssh_path


@functools.lru_cache(maxsize=8)
def rsync_version(rsync_path: str) -> tuple[int, ...]:
    """Return the version of the rsync at `rsync_path`, e.g. (3, 2, 7).

    Raises:
        SyncError: when `rsync --version` fails or prints no version.
    """
    try:
        completed = subprocess.run([rsync_path, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SyncError(f"cannot run {rsync_path} --version: {error}; check the rsync installation") from error
    match = re.search(r"version\s+(\d+)\.(\d+)\.(\d+)", completed.stdout)
    if completed.returncode != 0 or match is None:
        raise SyncError(f"{rsync_path} --version printed no version (exit code {completed.returncode}); check the rsync installation")
    return tuple(int(part) for part in match.groups())


def _transfer_endpoints(direction: Direction, local: Path, remote: RemoteTarget) -> tuple[str, str, RemoteTarget]:
    """Return the rsync source and destination arguments and the remote directory of this run."""
    if direction == "push":
        local_dir = Path(os.path.abspath(local))
        if validate_remote_path(local_dir.name, original=str(local_dir)) != local_dir.name:
            raise SyncValidationError(f"run directory name {local_dir.name!r} cannot be used as a remote path; rename the directory")
        remote_dir = RemoteTarget(remote.host, posixpath.join(remote.path, local_dir.name))
        # Absolute local paths start with '/', so rsync never reads them as HOST:PATH.
        return f"{local_dir}/", f"{remote_dir}/", remote_dir
    name = posixpath.basename(posixpath.normpath(remote.path))
    if name in ("", ".", "..", "/"):
        raise SyncValidationError(f"remote path {remote.path!r} names no run directory; pull a directory such as gpu-box:runs/NAME")
    local_dir = Path(os.path.abspath(local)) / name
    return f"{remote.host}:{posixpath.normpath(remote.path)}/", f"{local_dir}/", remote


def build_rsync_command(
    direction: Direction,
    local: Path,
    remote: RemoteTarget,
    settings: SyncSettings,
    *,
    dry_run: bool = False,
    progress: bool = False,
    rsync_path: str = "rsync",
    ssh_path: str = "ssh",
    version: tuple[int, ...] = (3, 2, 7),
) -> list[str]:
    """Build the rsync argument list for one push or pull.

    Args:
        direction: "push" copies `local` to `remote`, "pull" copies `remote` into `local`.
        local: the run directory (push) or the directory that receives the run (pull).
        remote: the validated remote directory.
        settings: connection and filter settings.
        dry_run: list what would move without moving it.
        progress: show rsync's overall progress (`--info=progress2`).
        rsync_path: the rsync executable.
        ssh_path: the ssh executable.
        version: the local rsync version; before 3.2.6 `--secluded-args` was called `--protect-args`.

    Returns:
        The argument list, starting with `rsync_path`.
    """
    source, destination, _ = _transfer_endpoints(direction, local, remote)
    # -rlpt is -a without owner, group and device files, which do not carry over between accounts.
    command = [rsync_path, "--recursive", "--links", "--perms", "--times"]
    command.append("--secluded-args" if version >= (3, 2, 6) else "--protect-args")
    command += [f"--partial-dir={PARTIAL_DIR}", "--itemize-changes", "--stats"]
    command += ["-e", format_rsh_string(build_ssh_command(ssh_path, settings))]
    if dry_run:
        command.append("--dry-run")
    if progress:
        command += ["--info=progress2", "--no-inc-recursive"]
    if settings.bwlimit is not None:
        command.append(f"--bwlimit={settings.bwlimit}")
    command += build_filter_args(settings)
    command += ["--", source, destination]
    return command


class _OutputParser:
    """Splits rsync's stdout into itemized changes, progress lines and --stats values."""

    def __init__(self, result: SyncResult, on_change: Callable[[ItemizedChange], None] | None, on_progress: Callable[[str], None] | None):
        self._result = result
        self._on_change = on_change
        self._on_progress = on_progress
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        """Handle a chunk of output; progress lines end in '\\r', all others in '\\n'."""
        self._pending += chunk
        parts = re.split(rb"[\r\n]", self._pending)
        self._pending = parts.pop()
        for part in parts:
            self._handle_line(part.decode("utf-8", errors="replace"))

    def close(self) -> None:
        """Handle a last line without a line ending."""
        if self._pending:
            self._handle_line(self._pending.decode("utf-8", errors="replace"))
            self._pending = b""

    def _handle_line(self, line: str) -> None:
        if not line.strip():
            return
        if _PROGRESS.match(line):
            if self._on_progress is not None:
                self._on_progress(line.strip())
            return
        if match := _ITEMIZED.fullmatch(line):
            change = ItemizedChange(match["code"], match["path"])
            self._result.changes.append(change)
            if self._on_change is not None:
                self._on_change(change)
            return
        if match := _STAT.fullmatch(line.split(" (")[0].removesuffix(" bytes").strip()):
            self._result.stats[match["key"]] = int(match["value"].replace(",", "").split(".")[0])
            return
        logger.debug("rsync: %s", line)


def _read_stderr(stream: IO[bytes], lines: list[str]) -> None:
    for raw in stream:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if line:
            lines.append(line)
            logger.debug("rsync stderr: %s", line)


def _remote_directory_missing(rsync_path: str, command: list[str], remote: RemoteTarget) -> bool:
    """List the remote destination directory of a failed push and return whether it does not exist.

    NOTE: rsync 3.5.0 dropped the remote receiver's error message (e.g. `mkdir ... failed`) in
    6 to 9 of 20 failed pushes to a local sshd. A remote sender's errors arrived every time,
    so this listing, where the remote side is the sender, shows whether the directory exists.
    """
    rsh = command[command.index("-e") + 1]
    protect = "--secluded-args" if "--secluded-args" in command else "--protect-args"
    probe = [rsync_path, "--list-only", protect, "-e", rsh, "--", f"{remote}/"]
    logger.debug("checking the remote directory: %s", probe)
    try:
        completed = subprocess.run(
            probe, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_rsync_environment(), timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.info("checking %s failed: %s", remote, error)
        return False
    stderr = completed.stderr.decode("utf-8", errors="replace")
    for line in stderr.splitlines():
        logger.info("rsync stderr (directory check): %s", line)
    return bool(re.search(r'\[sender\] (change_dir|link_stat)\S* "[^"]*" failed: No such file or directory', stderr))


def sync_run(
    direction: Direction,
    local: Path,
    remote: RemoteTarget,
    settings: SyncSettings,
    *,
    dry_run: bool = False,
    progress: bool | None = None,
    on_change: Callable[[ItemizedChange], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> SyncResult:
    """Push a run directory to a remote host, or pull one from it, with rsync over SSH.

    Args:
        direction: "push" copies `local` into `remote`, "pull" copies `remote` into `local`.
        local: the run directory (push, must exist) or the directory that receives the run
            (pull, created if missing unless `dry_run`).
        remote: the validated remote target, from `parse_remote`.
        settings: connection and filter settings, from `load_sync_settings`.
        dry_run: only list what would move.
        progress: show overall progress through `on_progress`; None means when stderr is a terminal.
        on_change: called with each itemized change as rsync reports it.
        on_progress: called with each rsync progress line.

    Returns:
        The changes and transfer statistics.

    Raises:
        SyncError: when rsync or ssh is missing, a local path is invalid, or rsync fails; the
            message names the host or path and the fix.
    """
    rsync_path, ssh_path = find_tools()
    version = rsync_version(rsync_path)
    if version < MIN_RSYNC_VERSION:
        raise SyncError(f"rsync {'.'.join(map(str, version))} at {rsync_path} is too old; install rsync 3.1.0 or newer")
    _check_local_directory(direction, local, dry_run)
    if progress is None:
        progress = sys.stderr.isatty() and not dry_run

    source, destination, remote_dir = _transfer_endpoints(direction, local, remote)
    command = build_rsync_command(
        direction, local, remote, settings, dry_run=dry_run, progress=progress, rsync_path=rsync_path, ssh_path=ssh_path, version=version
    )
    result = SyncResult(direction=direction, source=source.rstrip("/"), destination=destination.rstrip("/"), dry_run=dry_run)
    logger.info("%s%s %s -> %s", direction, " (dry run)" if dry_run else "", result.source, result.destination)
    logger.debug("running %s", command)
    if settings.insecure_no_host_key_check:
        logger.warning("host-key checking is off for %s; the connection is not protected against a man-in-the-middle", remote.host)

    returncode, stderr_lines = _run_rsync(command, _OutputParser(result, on_change, on_progress))
    if returncode not in (0, 24):
        for line in stderr_lines:
            logger.info("rsync stderr: %s", line)
        directory_missing = direction == "push" and returncode in (11, 12, 23) and _remote_directory_missing(rsync_path, command, remote)
        raise classify_failure(returncode, stderr_lines, direction, remote_dir, settings, dry_run=dry_run, remote_directory_missing=directory_missing)
    for line in stderr_lines:
        logger.warning("rsync: %s", line)
    if returncode == 24:
        logger.warning("some source files vanished during the transfer (rsync exit code 24); rerun to pick up their replacements")
    logger.debug("%s finished: %d files, stats %s", direction, len(result.files_moved), result.stats)
    return result


def _check_local_directory(direction: Direction, local: Path, dry_run: bool) -> None:
    if direction == "push":
        if not local.is_dir():
            raise SyncValidationError(f"local run directory {str(local)!r} not found; pass an existing directory such as runs/NAME")
        if not Path(os.path.abspath(local)).name:
            raise SyncValidationError(f"local path {str(local)!r} names no run directory; pass a directory such as runs/NAME")
        return
    if local.exists() and not local.is_dir():
        raise SyncValidationError(f"local destination {str(local)!r} is not a directory; pass a directory such as runs")
    if not dry_run:
        local.mkdir(parents=True, exist_ok=True)


def _rsync_environment() -> dict[str, str]:
    """Return the environment for rsync, with English messages so that failures can be classified.

    LC_ALL would override LC_MESSAGES, so its value moves to LC_CTYPE and file names keep their encoding.
    """
    environment = dict(os.environ)
    if "LC_ALL" in environment:
        environment.setdefault("LC_CTYPE", environment.pop("LC_ALL"))
    environment["LC_MESSAGES"] = "C"
    environment["LC_NUMERIC"] = "C"
    return environment


def _run_rsync(command: list[str], parser: _OutputParser) -> tuple[int, list[str]]:
    """Run rsync, feed its stdout to `parser`, and return its exit code and stderr lines."""
    stderr_lines: list[str] = []
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_rsync_environment())
    except OSError as error:
        raise SyncError(f"cannot start {command[0]}: {error}; check the rsync installation") from error
    stderr_reader = threading.Thread(target=_read_stderr, args=(process.stderr, stderr_lines), daemon=True)
    stderr_reader.start()
    try:
        while chunk := os.read(process.stdout.fileno(), 65536):
            parser.feed(chunk)
        parser.close()
        returncode = process.wait()
    except KeyboardInterrupt:
        # rsync keeps the partial file when it gets SIGINT; wait for that so a rerun can resume.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            logger.warning("rsync (pid %d) did not stop within 60 s of SIGINT; killing it", process.pid)
            process.kill()
            process.wait()
        raise
    finally:
        stderr_reader.join(timeout=10)
        process.stdout.close()
    return returncode, stderr_lines


_RSYNC_EXIT_MEANINGS = {
    1: "syntax or usage error",
    2: "protocol incompatibility",
    3: "error selecting input or output files",
    5: "error starting the client-server protocol",
    10: "socket I/O error",
    11: "file I/O error",
    12: "error in the rsync protocol data stream",
    20: "interrupted by a signal",
    23: "some files were not transferred",
    30: "timeout in data send or receive",
    255: "ssh failed",
}
_UNREACHABLE = re.compile(
    r"(Connection refused|Connection timed out|No route to host|Network is unreachable|Could not resolve hostname [^\n:]+|"
    r"Name or service not known|Temporary failure in name resolution|Operation timed out)"
)
_CONNECTION_LOST = re.compile(r"(Connection reset by peer|Broken pipe|Timeout, server [^\n]* not responding|Connection closed by [^\n]*)")


def classify_failure(
    returncode: int,
    stderr_lines: list[str],
    direction: Direction,
    remote_dir: RemoteTarget,
    settings: SyncSettings,
    *,
    dry_run: bool = False,
    remote_directory_missing: bool = False,
) -> SyncError:
    """Turn a failed rsync run into a one-line `SyncError` that names the host or path and the fix.

    Args:
        returncode: rsync's exit code (255 when ssh failed).
        stderr_lines: rsync's and ssh's stderr, one item per line.
        direction: "push" or "pull".
        remote_dir: the remote run directory of the transfer.
        settings: the settings used, for the port and identity in the hints.
        dry_run: whether the failed run was a dry run.
        remote_directory_missing: a push whose remote destination directory was found missing by a separate check.

    Returns:
        The error to raise.
    """
    text = "\n".join(stderr_lines)
    host: RemoteHost = remote_dir.host
    where = f"{host} port {settings.port}" if settings.port else str(host)
    port_flag = f"-p {settings.port} " if settings.port else ""
    known_hosts_name = f"[{host.host}]:{settings.port}" if settings.port and settings.port != 22 else host.host

    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return SyncError(
            f"host key of {where} differs from the one in known_hosts; if the host was reinstalled, "
            f"verify its new key and remove the old one with: ssh-keygen -R '{known_hosts_name}'"
        )
    if "Host key verification failed" in text:
        return SyncError(
            f"host key verification failed for {where}: its key is not in known_hosts; check the fingerprint and add it by "
            f"connecting once with: ssh {port_flag}{host}, or pass --insecure-no-host-key-check for a host you trust"
        )
    # ssh lists the methods it tried, "(publickey)"; an errno "(13)" is a file permission error.
    if re.search(r"Permission denied \((?!\d)", text):
        key = f"identity {settings.identity}" if settings.identity else "ssh's default keys"
        return SyncError(
            f"{where} rejected the SSH key ({key}): Permission denied (publickey); pass the right private key with --identity "
            "and check that its public key is in ~/.ssh/authorized_keys on the host"
        )
    if match := _UNREACHABLE.search(text):
        return SyncError(f"cannot reach {where}: {match[1]}; check the host name, the port (--port) and that sshd is running there")
    if returncode == 127 or re.search(r"rsync: (command )?not found", text):
        return SyncError(f"rsync is not installed on {host} or not on its PATH; install it there, e.g. apt-get install rsync")
    # The remote rsync is the sender of a pull and the receiver of a push.
    remote_role = "sender" if direction == "pull" else "receiver"
    missing = re.search(rf'\[{remote_role}\] (link_stat|change_dir|mkdir)\S* "[^"]*" failed: No such file or directory', text, re.IGNORECASE)
    if direction == "pull" and missing:
        return SyncError(
            f"remote path {remote_dir.path!r} not found on {host}; check the path (relative paths start in the remote home directory)"
        )
    if direction == "push" and (missing or remote_directory_missing):
        parent = posixpath.dirname(remote_dir.path) or "."
        return SyncError(
            f"remote directory {parent!r} not found on {host}; create it first (ssh {port_flag}{host} mkdir -p {parent}) or push to an existing directory"
        )
    if returncode == 20 or "received SIGINT, SIGTERM, or SIGHUP" in text:
        return SyncError(f"{direction} to or from {remote_dir} was interrupted; rerun the same command to resume from the partial files")
    if match := _CONNECTION_LOST.search(text):
        return SyncError(f"connection to {where} was lost ({match[1]}); rerun the same command to resume from the partial files")
    messages = [line for line in stderr_lines if line.startswith("rsync:") or line.startswith("ssh:")]
    detail = (messages or stderr_lines or ["no error message"])[-1]
    meaning = _RSYNC_EXIT_MEANINGS.get(returncode, "unknown error")
    label = f"{direction} dry run" if dry_run else direction
    return SyncError(f"rsync {label} for {remote_dir} failed with exit code {returncode} ({meaning}): {detail}")


def _format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def summarize(result: SyncResult) -> str:
    """Describe a finished push or pull in one line."""
    count = len(result.files_moved)
    size = _format_bytes(result.stats.get("Total transferred file size", 0))
    files = "file" if count == 1 else "files"
    if result.dry_run:
        return f"dry run: {count} {files} ({size}) would move from {result.source} to {result.destination}; nothing was transferred"
    if count == 0:
        return f"nothing to {result.direction}: {result.destination} is up to date"
    summary = f"{result.direction}ed {count} {files} ({size}) from {result.source} to {result.destination}"
    matched = result.stats.get("Matched data", 0)
    if matched:
        summary += f"; {_format_bytes(matched)} of it reused from existing or partially transferred files"
    return summary


def _split_presets(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _command_sync(args: argparse.Namespace) -> int:
    overrides = {
        "port": args.port,
        "identity": args.identity,
        "ssh_options": args.ssh_options,
        "only": _split_presets(args.only),
        "include": args.include,
        "exclude": args.exclude,
        "bwlimit": args.bwlimit,
        "insecure_no_host_key_check": args.insecure_no_host_key_check,
    }
    show_progress = sys.stderr.isatty() and not args.dry_run
    progress_shown = False

    def print_change(change: ItemizedChange) -> None:
        print(f"{change.code} {change.path}", flush=True)

    def print_progress(line: str) -> None:
        nonlocal progress_shown
        progress_shown = True
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()

    quiet_changes = show_progress or args.dry_run
    try:
        settings = load_sync_settings(args.config, overrides)
        remote = parse_remote(args.remote, settings.host)
        result = sync_run(
            args.sync_direction,
            args.local,
            remote,
            settings,
            dry_run=args.dry_run,
            progress=show_progress,
            on_change=None if quiet_changes else print_change,
            on_progress=print_progress if show_progress else None,
        )
    except SyncValidationError as error:
        print(f"mmalign sync: error: {error}", file=sys.stderr)
        return 2
    except SyncError as error:
        print(f"\nmmalign sync: error: {error}" if progress_shown else f"mmalign sync: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmmalign sync: interrupted; partial files are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    if progress_shown:
        sys.stderr.write("\n")
    if args.dry_run:
        for path in result.files_moved:
            print(path)
    print(summarize(result))
    return 0


def _add_sync_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=None, help="SSH port on the remote host (default: ssh's, usually 22).")
    parser.add_argument("--identity", type=Path, default=None, metavar="FILE", help="Private key file for ssh -i.")
    parser.add_argument(
        "--ssh-option",
        dest="ssh_options",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="Extra ssh -o option from an allow-list (e.g. ConnectTimeout=10, UserKnownHostsFile=FILE); repeatable.",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="PRESETS",
        help=f"Transfer only these comma-separated presets: {', '.join(FILTER_PRESETS)} (e.g. results,reports).",
    )
    parser.add_argument("--include", action="append", default=None, metavar="PATTERN", help="rsync include pattern; files matching no include are skipped. Repeatable.")
    parser.add_argument("--exclude", action="append", default=None, metavar="PATTERN", help="rsync exclude pattern, applied before includes. Repeatable.")
    parser.add_argument("--bwlimit", type=int, default=None, metavar="KIBPS", help="Bandwidth limit in KiB/s.")
    parser.add_argument("--dry-run", action="store_true", help="List the files that would move and transfer nothing.")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="YAML file with a 'sync:' mapping of these settings; flags override it.")
    parser.add_argument(
        "--insecure-no-host-key-check",
        action="store_true",
        default=None,
        help="Turn off SSH host-key verification (exposes the transfer to a man-in-the-middle); only for hosts you trust.",
    )


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `sync push` and `sync pull` to an argparse subparsers object.

    Each sets `handler` to a function that takes the parsed arguments and returns an exit
    code: 0 on success, 1 when the transfer failed, 2 for invalid arguments, 130 when interrupted.
    """
    sync_parser = subparsers.add_parser(
        "sync",
        help="Copy runs to or from another machine with rsync over SSH.",
        description="Copy run directories between machines with rsync over SSH. Interrupted transfers resume on rerun.",
    )
    actions = sync_parser.add_subparsers(dest="sync_direction", required=True, metavar="{push,pull}")

    push = actions.add_parser("push", help="Copy a local run directory into HOST:PATH/NAME.")
    push.add_argument("local", type=Path, metavar="LOCAL_RUN_DIR", help="Run directory to send, e.g. runs/demo.")
    push.add_argument(
        "remote", metavar="HOST:PATH", help="[USER@]HOST:PATH of an existing remote directory; the run lands in PATH/NAME. A bare PATH uses sync.host."
    )
    _add_sync_options(push)
    push.set_defaults(handler=_command_sync)

    pull = actions.add_parser("pull", help="Copy the remote run directory HOST:PATH into LOCAL_DIR/NAME.")
    pull.add_argument("remote", metavar="HOST:PATH", help="[USER@]HOST:PATH of the remote run directory. A bare PATH uses sync.host.")
    pull.add_argument("local", type=Path, metavar="LOCAL_DIR", help="Local directory that receives the run (created if missing).")
    _add_sync_options(pull)
    pull.set_defaults(handler=_command_sync)
