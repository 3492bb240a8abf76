"""A private Dovecot IMAP server for tests, run from its own config in a temp dir."""

from __future__ import annotations

import atexit
import contextlib
import imaplib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .ports import free_port, wait_port, wait_port_closed

DOVECOT_BIN = "/usr/sbin/dovecot"
# Dovecot refuses to run mail processes for uids below first_valid_uid (500) and never as
# root, so every virtual user's maildir belongs to this one ordinary system user.
MAIL_USER = "loketmail"

_CONFIG = """\
protocols = imap
listen = 127.0.0.1
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log_path}
info_log_path = {log_path}
instance_name = loket-test-{port}
ssl = {ssl}
{ssl_files}
disable_plaintext_auth = no
auth_mechanisms = plain login
# Tests check wrong passwords; the default two-second penalty only slows them down.
auth_failure_delay = 0
mail_location = maildir:~/Maildir
# A test server's data need not survive a power cut; skipping fsync keeps appends fast.
mail_fsync = never
first_valid_uid = 500
login_greeting = loket test imap ready
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users_dir}/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users_dir}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ssl_port}
    ssl = yes
  }}
}}
"""


def ensure_mail_user(name: str = MAIL_USER) -> pwd.struct_passwd:
    """Return the system user that owns the test maildirs, creating it when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
        capture_output=True,
        text=True,
        check=False,
    )
    # Exit status 9: another test process created it in the meantime.
    if result.returncode not in (0, 9):
        raise RuntimeError(f"useradd {name} failed: {result.stderr.strip()}")
    entry = pwd.getpwnam(name)
    if entry.pw_uid < 500:
        raise RuntimeError(f"user {name} has uid {entry.pw_uid}; Dovecot needs 500 or more")
    return entry


def _make_traversable(path: Path) -> None:
    """Let other users pass through `path` and its parents (search bit only, no listing).

    Dovecot's auth and mail processes run as unprivileged users and must reach the
    users file and the homes, which may sit under a 0700 temp dir owned by root.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)


def _make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 made with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class DovecotServer:
    """One Dovecot master process serving IMAP on a loopback port from `root`."""

    host = "127.0.0.1"

    def __init__(self, root: Path, port: int | None = None, tls: bool = False) -> None:
        self.root = root
        self.port = port or free_port()
        self.tls = tls
        # With tls, the imaps listener gets its own port and the plain port offers STARTTLS.
        self.ssl_port = free_port() if tls else 0
        self.cert_file: Path | None = None
        self.config_file = root / "dovecot.conf"
        # One passwd-file per user: Dovecot re-reads a changed file at most once a second,
        # while a file it has never opened is read at the first login.
        self.users_dir = root / "users"
        self.log_file = root / "dovecot.log"
        self.homes = root / "homes"
        self._passwords: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._owns_root = False
        self._mail_user = ensure_mail_user()

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls, tmpdir: str | os.PathLike[str] | None = None, tls: bool = False
    ) -> DovecotServer:
        """Write a config under a fresh dir, start Dovecot and wait until it listens.

        The files live in a new dir in the system temp dir, removed by `close()` or at exit:
        Dovecot's unprivileged processes must traverse every parent of it, and pytest's
        basetemp does not suit, since each pytest run resets its parent to mode 0700.
        With `tmpdir`, a `dovecot` link there points at the files (config, log, maildirs).
        """
        root = Path(tempfile.mkdtemp(prefix="loket-dovecot-"))
        server = cls(root, tls=tls)
        server._owns_root = True
        # A test run that dies without teardown must not leave a Dovecot behind.
        atexit.register(server.close)
        try:
            server._prepare()
            server._launch()
        except BaseException:
            server.close()
            raise
        if tmpdir is not None:
            link = Path(tmpdir) / "dovecot"
            if not link.exists():
                link.symlink_to(root, target_is_directory=True)
        return server

    def _prepare(self) -> None:
        _make_traversable(self.root)
        os.chmod(self.root, 0o755)
        for sub in ("run", "state", "homes", "users"):
            (self.root / sub).mkdir(exist_ok=True)
        ssl_files = ""
        if self.tls:
            cert, key = _make_certificate(self.root)
            self.cert_file = cert
            ssl_files = f"ssl_cert = <{cert}\nssl_key = <{key}"
        self.config_file.write_text(
            _CONFIG.format(
                base_dir=self.root / "run",
                state_dir=self.root / "state",
                log_path=self.log_file,
                port=self.port,
                ssl_port=self.ssl_port,
                ssl="yes" if self.tls else "no",
                ssl_files=ssl_files,
                users_dir=self.users_dir,
            )
        )

    def _launch(self) -> None:
        with open(self.log_file, "ab") as log:
            # -F keeps the master in the foreground so this Popen owns it; its stdio goes to
            # the log so it never holds a captured test's stdout open.
            self._process = subprocess.Popen(
                [DOVECOT_BIN, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_port(self.host, self.port, timeout=10)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"dovecot did not start; log:\n{self.log_tail()}") from None

    def stop(self) -> None:
        """Stop the master and every process it started, and wait until the port is free."""
        process, self._process = self._process, None
        if process is None:
            return
        # The master leaves its imap, log and stats children running when it exits alone,
        # so the whole process group (start_new_session made it the master's) is signalled.
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        deadline = time.monotonic() + 3
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        _signal_group(process.pid, signal.SIGKILL)
        wait_port_closed(self.host, self.port, timeout=10)

    def close(self) -> None:
        """Stop the server and remove its files when `start` made the dir itself."""
        self.stop()
        atexit.unregister(self.close)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Stop, then start again on the same port with the same users and mail."""
        self.stop()
        self._launch()

    @property
    def running(self) -> bool:
        """Whether the master process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> DovecotServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """The end of Dovecot's log, for failure messages."""
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    # -- users and mail --------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a virtual user with its own home; usable at once, without a reload.

        Changing an existing user's password may take a second to be noticed.
        """
        if not name or any(ch in name for ch in ":/") or ":" in password:
            raise ValueError("user names cannot hold ':' or '/', passwords cannot hold ':'")
        home = self.homes / name
        home.mkdir(parents=True, exist_ok=True)
        shutil.chown(home, self._mail_user.pw_uid, self._mail_user.pw_gid)
        os.chmod(home, 0o700)
        self._passwords[name] = password
        uid, gid = self._mail_user.pw_uid, self._mail_user.pw_gid
        entry = self.users_dir / name
        tmp = entry.with_suffix(".tmp")
        tmp.write_text(f"{name}:{{PLAIN}}{password}:{uid}:{gid}::{home}::\n")
        os.chmod(tmp, 0o644)
        tmp.replace(entry)

    def password(self, user: str) -> str:
        """The password `add_user` set for `user`."""
        return self._passwords[user]

    def _login(self, user: str) -> imaplib.IMAP4:
        client = imaplib.IMAP4(self.host, self.port, timeout=10)
        client.login(user, self._passwords[user])
        return client

    def append(self, user: str, message: bytes, folder: str = "INBOX") -> int:
        """Append one message to `user`'s folder; returns the UID the server gave it."""
        return self.append_many(user, [message], folder)[0]

    def append_many(self, user: str, messages: list[bytes], folder: str = "INBOX") -> list[int]:
        """Append messages over one connection; returns their UIDs in order."""
        client = self._login(user)
        try:
            if folder.upper() != "INBOX":
                client.create(_quote(folder))  # NO when it already exists, which is fine
            uids: list[int] = []
            for message in messages:
                status, data = client.append(_quote(folder), None, None, message)
                if status != "OK":
                    raise RuntimeError(f"APPEND failed: {data!r}")
                uids.append(_appenduid(data))
            return uids
        finally:
            client.logout()

    def create_folder(self, user: str, folder: str) -> None:
        """Create a folder for `user`."""
        client = self._login(user)
        try:
            status, data = client.create(_quote(folder))
            if status != "OK":
                raise RuntimeError(f"CREATE {folder} failed: {data!r}")
        finally:
            client.logout()

    def count(self, user: str, folder: str = "INBOX") -> int:
        """How many messages `user`'s folder holds."""
        client = self._login(user)
        try:
            status, data = client.status(_quote(folder), "(MESSAGES)")
            if status != "OK":
                raise RuntimeError(f"STATUS failed: {data!r}")
            text = data[0].decode() if isinstance(data[0], bytes) else str(data[0])
            return int(text.rsplit("MESSAGES", 1)[1].strip(" )"))
        finally:
            client.logout()

    def flags(self, user: str, uid: int, folder: str = "INBOX") -> set[str]:
        """The flags of one message, read without changing them."""
        client = self._login(user)
        try:
            client.select(_quote(folder), readonly=True)
            status, data = client.uid("FETCH", str(uid), "(FLAGS)")
            if status != "OK" or not data or data[0] is None:
                raise RuntimeError(f"no message with UID {uid}")
            flags = imaplib.ParseFlags(data[0] if isinstance(data[0], bytes) else data[0][0])
            return {flag.decode() for flag in flags}
        finally:
            client.logout()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _quote(mailbox: str) -> str:
    """An IMAP quoted string; imaplib sends mailbox names as they are."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _appenduid(data: Sequence[bytes | None]) -> int:
    """The UID from a tagged `OK [APPENDUID validity uid]` answer (Dovecot has UIDPLUS)."""
    text = (data[0] or b"").decode()
    marker = "APPENDUID "
    if marker not in text:
        raise RuntimeError(f"server gave no APPENDUID: {text!r}")
    return int(text.split(marker, 1)[1].split("]", 1)[0].split()[1])
