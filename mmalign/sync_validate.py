"""Input validation for `mmalign sync`, and the ssh and filter arguments built from checked input.

Everything a user types that ends up in the rsync or ssh argument list passes through here
first: remote specs, ssh options, filter patterns and the `sync:` config. Host names, remote
paths and ssh options are checked against allow-lists, so a value that a remote shell or ssh
would read as a command is rejected before any process starts.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class SyncError(RuntimeError):
    """A sync that could not start or did not finish; the message names the host or path and the fix."""


class SyncValidationError(SyncError, ValueError):
    """An invalid host, path, ssh option, filter or config value, rejected before rsync runs."""


# Presets for `--only`. Patterns without a slash match a file name at any depth, and
# `DIR/**` matches everything below a directory of that name.
FILTER_PRESETS: dict[str, tuple[str, ...]] = {
    "results": ("results.parquet", "*.csv", "manifest.json", "config.yaml", "controls.json", "run.log", "train_metrics.jsonl"),
    "reports": ("*.html",),
    "checkpoints": ("checkpoints/**",),
    "probes": ("probes/**",),
}
PresetName = Literal["results", "reports", "checkpoints", "probes"]

# ssh options that only tune the connection. Anything else, notably ProxyCommand,
# LocalCommand, PermitLocalCommand, KnownHostsCommand and RemoteCommand, can run a command.
# StrictHostKeyChecking is set only through `insecure_no_host_key_check`.
ALLOWED_SSH_OPTIONS: tuple[str, ...] = (
    "AddressFamily",
    "Ciphers",
    "Compression",
    "ConnectionAttempts",
    "ConnectTimeout",
    "GlobalKnownHostsFile",
    "HostKeyAlgorithms",
    "HostKeyAlias",
    "IdentitiesOnly",
    "IPQoS",
    "KexAlgorithms",
    "LogLevel",
    "MACs",
    "PubkeyAcceptedAlgorithms",
    "ServerAliveCountMax",
    "ServerAliveInterval",
    "TCPKeepAlive",
    "UserKnownHostsFile",
)
_ALLOWED_SSH_OPTIONS_LOWER = {name.lower(): name for name in ALLOWED_SSH_OPTIONS}
_COMMAND_SSH_OPTIONS = {"proxycommand", "localcommand", "permitlocalcommand", "knownhostscommand", "remotecommand", "match", "proxyjump", "proxyusefdpass"}

PARTIAL_DIR = ".rsync-partial"  # where the receiver keeps interrupted files; a rerun resumes from them
# Appended after the user's options, so a user value for the same key wins (ssh keeps the first).
DEFAULT_SSH_OPTIONS = ("ConnectTimeout=15", "ServerAliveInterval=15", "ServerAliveCountMax=4")
_RSH_PLAIN_WORD = re.compile(r"[\w@%+=:,./-]+")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}")
# One DNS label; underscores are accepted because ssh_config Host aliases often contain them.
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")
# Remote path characters that no POSIX shell treats specially: word characters (Unicode
# letters, digits, underscore) and . / + , = @ % : -
_REMOTE_PATH = re.compile(r"[\w./+,=@%:-]+")
_SSH_OPTION_VALUE = re.compile(r"[\w./+,=@%:~-]+")
# [USER@]HOST:PATH, where HOST may be a bracketed IPv6 address.
_REMOTE_SPEC = re.compile(r"(?:(?P<user>[^@:\[\]/]*)@)?(?P<host>\[[^\]]*\]|[^@:\[\]/]+):(?P<path>.*)", re.DOTALL)


def _check_no_control_chars(kind: str, value: str) -> None:
    if _CONTROL_CHARS.search(value):
        raise SyncValidationError(f"invalid {kind} {value!r}: control characters (newline, NUL, tab, ...) are not allowed")


@dataclass(frozen=True)
class RemoteHost:
    """A validated ssh destination: an optional login name and a host."""

    user: str | None
    host: str  # DNS name, IPv4 address, or IPv6 address without brackets

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host


@dataclass(frozen=True)
class RemoteTarget:
    """A validated remote location: a host and a path on it."""

    host: RemoteHost
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}"


def parse_host(value: str) -> RemoteHost:
    """Parse and validate `[USER@]HOST`.

    Args:
        value: a login name and host, e.g. `alice@gpu-01.lab.example`, `10.0.0.5` or `[fe80::1]`.

    Returns:
        The validated host.

    Raises:
        SyncValidationError: when the user or host part is not a plain name or address.
    """
    _check_no_control_chars("host", value)
    user, sep, host = value.rpartition("@")
    if not sep:
        user = ""
    if sep and not _USER.fullmatch(user):
        raise SyncValidationError(
            f"invalid user name {user!r} in {value!r}: expected letters, digits, '.', '_' or '-', starting with a letter or '_'"
        )
    return RemoteHost(user=user or None, host=_validate_host_name(host, value))


def _validate_host_name(host: str, original: str) -> str:
    expected = "expected a DNS name, an IPv4 address or a bracketed IPv6 address such as [::1]"
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise SyncValidationError(f"invalid IPv6 address {host!r} in {original!r}: {expected}") from None
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise SyncValidationError(f"invalid IPv4 address {host!r} in {original!r}: {expected}") from None
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise SyncValidationError(f"invalid host {host!r} in {original!r}: {expected}")
    return host


def validate_remote_path(path: str, original: str | None = None) -> str:
    """Validate a path on the remote host and return it in the form passed to rsync.

    A leading `~/` is dropped, because rsync resolves relative remote paths against the
    remote home directory anyway, and with `--secluded-args` (checked with rsync 3.5.0) a
    remote `~` is taken literally.

    Args:
        path: the path after `HOST:`.
        original: the full argument, used in error messages.

    Returns:
        The path, relative to the remote home directory unless it starts with '/'.

    Raises:
        SyncValidationError: for an empty path, a leading '-', control characters or any
            character that a remote shell would interpret.
    """
    full_spec = original if original is not None else path
    _check_no_control_chars("remote path", full_spec)
    if path == "~":
        path = "."
    elif path.startswith("~/"):
        path = path[2:] or "."
    if not path:
        raise SyncValidationError(f"missing remote path in {full_spec!r}: write HOST:PATH, e.g. gpu-box:runs")
    if path.startswith("-"):
        raise SyncValidationError(f"invalid remote path {path!r} in {full_spec!r}: a path must not start with '-'; write ./{path} instead")
    if path.startswith(":"):
        raise SyncValidationError(f"invalid remote {full_spec!r}: rsync daemon paths (HOST::MODULE) are not supported, use HOST:PATH over SSH")
    if not _REMOTE_PATH.fullmatch(path):
        bad = sorted({char for char in path if not _REMOTE_PATH.fullmatch(char)})
        raise SyncValidationError(
            f"invalid remote path {path!r} in {full_spec!r}: characters {''.join(bad)!r} are not allowed; "
            "use letters, digits and . / _ + , = @ % : -"
        )
    return path


def parse_remote(spec: str, default_host: str | None = None) -> RemoteTarget:
    """Parse `[USER@]HOST:PATH`, or a bare PATH on `default_host`.

    Args:
        spec: the remote argument from the command line.
        default_host: `[USER@]HOST` from the config, used when `spec` has no host part.

    Returns:
        The validated target.

    Raises:
        SyncValidationError: when any part is invalid, or `spec` has no host and no default is set.
    """
    _check_no_control_chars("remote", spec)
    if "://" in spec:
        raise SyncValidationError(f"invalid remote {spec!r}: URLs such as rsync:// are not supported, write [USER@]HOST:PATH")
    match = _REMOTE_SPEC.fullmatch(spec)
    if match is not None:
        host_part = f"{match['user']}@{match['host']}" if match["user"] is not None else match["host"]
        return RemoteTarget(host=parse_host(host_part), path=validate_remote_path(match["path"], spec))
    if default_host is not None and ":" not in spec:
        return RemoteTarget(host=parse_host(default_host), path=validate_remote_path(spec))
    raise SyncValidationError(f"invalid remote {spec!r}: expected [USER@]HOST:PATH (or a bare PATH when sync.host is set in --config)")


def validate_ssh_option(option: str) -> str:
    """Validate one `Key=Value` ssh option against the allow-list and return it with the key's canonical case.

    Raises:
        SyncValidationError: for options that can run commands, unknown keys, or values with
            whitespace, quotes or shell metacharacters.
    """
    _check_no_control_chars("ssh option", option)
    key, sep, value = option.partition("=")
    key = key.strip()
    if key.lower() in _COMMAND_SSH_OPTIONS:
        raise SyncValidationError(
            f"ssh option {option!r} is not allowed because {key} can run commands; set it in ~/.ssh/config for a Host alias if you need it"
        )
    if key.lower() == "stricthostkeychecking":
        raise SyncValidationError(f"ssh option {option!r} is not allowed; use --insecure-no-host-key-check to turn host-key checking off")
    if not sep or not key or not value:
        raise SyncValidationError(f"invalid ssh option {option!r}: write it as Key=Value, e.g. ConnectTimeout=10")
    canonical = _ALLOWED_SSH_OPTIONS_LOWER.get(key.lower())
    if canonical is None:
        raise SyncValidationError(f"ssh option {key!r} is not in the allow-list; allowed: {', '.join(ALLOWED_SSH_OPTIONS)}")
    if not _SSH_OPTION_VALUE.fullmatch(value):
        raise SyncValidationError(
            f"invalid value {value!r} for ssh option {canonical}: use letters, digits and . / _ + , = @ % : ~ - (no spaces or quotes)"
        )
    return f"{canonical}={value}"


def validate_filter_pattern(pattern: str) -> str:
    """Validate an rsync include or exclude pattern.

    Raises:
        SyncValidationError: for empty patterns, control characters, a leading '!' (which
            clears rsync's filter list) or a leading rule prefix such as '+ ' or '- '.
    """
    _check_no_control_chars("filter pattern", pattern)
    if not pattern.strip():
        raise SyncValidationError(f"invalid filter pattern {pattern!r}: a pattern must not be empty")
    # --include and --exclude still read an old-style "+ " or "- " prefix as a rule.
    if pattern.startswith("!") or re.match(r"[-+]\s", pattern):
        raise SyncValidationError(f"invalid filter pattern {pattern!r}: write the bare pattern, e.g. '*.html', without a rule prefix or '!'")
    return pattern


class SyncSettings(BaseModel):
    """Connection and filter settings for `mmalign sync`, from the `sync:` section of a YAML file and from flags."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(None, description="Default [USER@]HOST, used when the remote argument is a bare PATH.")
    port: int | None = Field(None, ge=1, le=65535, description="SSH port; unset uses ssh's default or ~/.ssh/config.")
    identity: Path | None = Field(None, description="Private key file passed to ssh -i.")
    ssh_options: list[str] = Field(default_factory=list, description="Extra ssh -o Key=Value options from an allow-list.")
    only: list[PresetName] = Field(default_factory=list, description="Presets to transfer: results, reports, checkpoints, probes.")
    include: list[str] = Field(default_factory=list, description="rsync include patterns; with any include, unmatched files are skipped.")
    exclude: list[str] = Field(default_factory=list, description="rsync exclude patterns, applied before includes.")
    bwlimit: int | None = Field(None, ge=1, description="Bandwidth limit in KiB/s (rsync --bwlimit).")
    insecure_no_host_key_check: bool = Field(False, description="Skip host-key verification; leave off unless the host is trusted.")

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_host(value))

    @field_validator("identity")
    @classmethod
    def _check_identity(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        _check_no_control_chars("identity file", str(value))
        path = value.expanduser()
        if not path.is_file():
            raise ValueError(f"identity file {str(value)!r} not found; pass the private key, e.g. ~/.ssh/id_ed25519")
        return path.resolve()

    @field_validator("ssh_options")
    @classmethod
    def _check_ssh_options(cls, values: list[str]) -> list[str]:
        return [validate_ssh_option(value) for value in values]

    @field_validator("include", "exclude")
    @classmethod
    def _check_patterns(cls, values: list[str]) -> list[str]:
        return [validate_filter_pattern(value) for value in values]


def _format_validation_error(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "sync"
        message = str(item["msg"]).removeprefix("Value error, ")
        value = item.get("input")
        value_text = repr(str(value)) if isinstance(value, Path) else repr(value)
        problems.append(f"sync.{field} = {value_text}: {message}")
    return f"invalid sync settings ({source}): " + "; ".join(problems)


def load_sync_settings(config_path: Path | None, overrides: dict[str, Any]) -> SyncSettings:
    """Build the settings from the optional YAML file's `sync:` mapping, with flags overriding it.

    Args:
        config_path: a YAML file with a `sync:` mapping, or None.
        overrides: values from flags; a None value leaves the file's value in place.

    Returns:
        The validated settings.

    Raises:
        SyncValidationError: when the file is missing or unreadable, or any value is invalid.
    """
    values: dict[str, Any] = {}
    source = "flags"
    if config_path is not None:
        source = f"{config_path} and flags"
        try:
            document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise SyncValidationError(f"cannot read sync config {config_path}: {error}") from error
        section = document.get("sync") if isinstance(document, dict) else None
        if section is None:
            raise SyncValidationError(f"sync config {config_path} has no 'sync:' mapping; add one with keys such as host, port, identity")
        if not isinstance(section, dict):
            raise SyncValidationError(f"'sync' in {config_path} must be a mapping, got {type(section).__name__}")
        values.update(section)
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return SyncSettings.model_validate(values)
    except ValidationError as error:
        raise SyncValidationError(_format_validation_error(error, source)) from None


def build_ssh_command(ssh_path: str, settings: SyncSettings) -> list[str]:
    """Build the ssh command that rsync runs as its remote shell."""
    command = [ssh_path, "-o", "BatchMode=yes"]
    if settings.insecure_no_host_key_check:
        # /dev/null keeps an unverified key out of known_hosts.
        command += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    else:
        command += ["-o", "StrictHostKeyChecking=yes"]
    if settings.port is not None:
        command += ["-p", str(settings.port)]
    defaults = list(DEFAULT_SSH_OPTIONS)
    if settings.identity is not None:
        command += ["-i", str(settings.identity)]
        defaults.append("IdentitiesOnly=yes")
    for option in [*settings.ssh_options, *defaults]:
        command += ["-o", option]
    return command


def format_rsh_string(words: list[str]) -> str:
    """Join words into one `rsync -e` value.

    rsync splits this value itself, without a shell: words are separated by spaces, text in
    single or double quotes is kept together, and a doubled quote inside quotes is a literal quote.
    A test pushes with a key path containing a space and a quote to check this.
    """
    quoted = []
    for word in words:
        if _RSH_PLAIN_WORD.fullmatch(word):
            quoted.append(word)
        else:
            quoted.append("'" + word.replace("'", "''") + "'")
    return " ".join(quoted)


def build_filter_args(settings: SyncSettings) -> list[str]:
    """Build rsync filter options: excludes first, then includes, then skip everything else.

    rsync uses the first rule that matches. Directories are included so that it descends into
    them, and `--prune-empty-dirs` drops the ones left empty. Without includes or presets
    only the excludes apply.
    """
    # rsync adds its own exclude for a relative --partial-dir, but after these rules, where
    # `--include=*/` would match the directory first.
    args = [f"--exclude={PARTIAL_DIR}/"]
    args += [f"--exclude={pattern}" for pattern in settings.exclude]
    includes = [pattern for preset in settings.only for pattern in FILTER_PRESETS[preset]]
    includes += settings.include
    if includes:
        args.append("--include=*/")
        args += [f"--include={pattern}" for pattern in includes]
        args += ["--exclude=*", "--prune-empty-dirs"]
    return args
