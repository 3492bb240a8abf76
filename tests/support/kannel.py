"""A private Kannel (bearerbox + smsbox + fakesmsc) for tests, started without systemd."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .ports import free_port, wait_port

BEARERBOX = "/usr/sbin/bearerbox"
SMSBOX = "/usr/sbin/smsbox"
FAKESMSC = "/usr/lib/kannel/test/fakesmsc"
_STDBUF = ["stdbuf", "-i0"] if shutil.which("stdbuf") else []

# fakesmsc logs each MT the fake SMSC hands it as `Got message N: <sender receiver type data>`.
_GOT_MESSAGE = re.compile(r"Got message \d+: <(.*)>\s*$")


def kannel_available() -> bool:
    """True when the Kannel binaries this harness needs are installed."""
    return all(Path(p).exists() for p in (BEARERBOX, SMSBOX, FAKESMSC))


@dataclass(frozen=True)
class FakeMT:
    """One mobile-terminated message as the fake SMSC handed it to fakesmsc."""

    sender: str
    receiver: str
    kind: str  # text, data, ucs-2, udh
    text: str
    received_at: float


def _parse_mt(line: str, at: float) -> FakeMT | None:
    fields = line.split(" ", 3)
    if len(fields) < 3:
        return None
    sender, receiver, kind = fields[0], fields[1], fields[2]
    data = fields[3] if len(fields) > 3 else ""
    if kind == "ucs-2":
        # Kannel's URL encoding writes the byte 0x20 as '+', inside UTF-16 too.
        raw = urllib.parse.unquote_to_bytes(data.replace("+", "%20"))
        text = raw.decode("utf-16-be", errors="replace")
    elif kind == "data":
        text = urllib.parse.unquote_to_bytes(data).decode("latin-1")
    elif kind == "udh":
        # `udh <udh> data <payload>`: keep the payload, the UDH only says which part it is.
        payload = data.split(" data ", 1)[-1]
        text = urllib.parse.unquote_to_bytes(payload).decode("latin-1")
    else:
        text = data
    return FakeMT(sender=sender, receiver=receiver, kind=kind, text=text, received_at=at)


class KannelGateway:
    """bearerbox, smsbox and fakesmsc on free loopback ports, configured from a temp dir.

    `get_url` is the sms-service URL for mobile-originated messages, with Kannel's
    escapes (%p, %P, %a, %t, %I) left in it.
    """

    def __init__(self, get_url: str, *, username: str = "loket", startup_timeout: float = 15.0):
        self.get_url = get_url
        self.username = username
        self.password = secrets.token_urlsafe(12)
        self.admin_password = secrets.token_urlsafe(12)
        self.dir = Path(tempfile.mkdtemp(prefix="loket-kannel-"))
        self.admin_port = free_port()
        self.smsbox_port = free_port()
        self.smsc_port = free_port()
        self.sendsms_port = free_port()
        self.sendsms_url = f"http://127.0.0.1:{self.sendsms_port}/cgi-bin/sendsms"
        self.startup_timeout = startup_timeout
        self._procs: list[subprocess.Popen[bytes]] = []
        self._fakesmsc: subprocess.Popen[bytes] | None = None
        self._mt: list[FakeMT] = []
        self._mt_lock = threading.Condition()
        self._reader: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stdin_lock = threading.Lock()

    def config_text(self) -> str:
        """The kannel.conf this gateway runs with."""
        d = self.dir
        return f"""
group = core
admin-port = {self.admin_port}
admin-interface = 127.0.0.1
admin-password = {self.admin_password}
status-password = {self.admin_password}
admin-allow-ip = "127.0.0.1"
smsbox-port = {self.smsbox_port}
smsbox-interface = 127.0.0.1
box-allow-ip = "127.0.0.1"
log-file = "{d}/bearerbox.log"
log-level = 0
access-log = "{d}/access.log"
dlr-storage = internal
sms-combine-concatenated-mo = true
sms-combine-concatenated-mo-timeout = 30

group = smsc
smsc = fake
smsc-id = fake
port = {self.smsc_port}
connect-allow-ip = "127.0.0.1"

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {self.smsbox_port}
sendsms-port = {self.sendsms_port}
sendsms-interface = 127.0.0.1
log-file = "{d}/smsbox.log"
log-level = 0
mo-recode = true
http-request-retry = 5
http-queue-delay = 1

group = sendsms-user
username = {self.username}
password = {self.password}
concatenation = true
max-messages = 10

group = sms-service
keyword = default
catch-all = true
get-url = "{self.get_url}"
max-messages = 0
concatenation = true
"""

    def start(self) -> KannelGateway:
        """Start the three processes and wait until the fake SMSC client is connected."""
        conf = self.dir / "kannel.conf"
        conf.write_text(self.config_text())
        try:
            self._spawn([BEARERBOX, str(conf)], "bearerbox.out")
            wait_port("127.0.0.1", self.smsbox_port, self.startup_timeout)
            wait_port("127.0.0.1", self.smsc_port, self.startup_timeout)
            self._spawn([SMSBOX, str(conf)], "smsbox.out")
            wait_port("127.0.0.1", self.sendsms_port, self.startup_timeout)
            self._fakesmsc = subprocess.Popen(
                # Unbuffered stdin: with stdio buffering, a line read along with an earlier
                # one waits in the buffer until the next select() wake-up on stdin.
                [
                    *_STDBUF,
                    FAKESMSC,
                    "-H",
                    "127.0.0.1",
                    "-r",
                    str(self.smsc_port),
                    "-i",
                    "0",
                    "-v",
                    "0",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self._procs.append(self._fakesmsc)
            self._reader = threading.Thread(target=self._read_fakesmsc, daemon=True)
            self._reader.start()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
            self._wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> KannelGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, argv: list[str], out_name: str) -> None:
        out = open(self.dir / out_name, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        out.close()
        self._procs.append(proc)

    def status(self) -> str:
        """bearerbox's plain-text status page."""
        url = f"http://127.0.0.1:{self.admin_port}/status.txt?password={self.admin_password}"
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode("utf-8", errors="replace"))

    def _wait_ready(self, timeout: float) -> None:
        # Ready = smsbox attached to bearerbox and the fake SMSC client on-line; an MO
        # injected before smsbox is attached sits in bearerbox's queue for about a second.
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = self.status()
            if "smsbox:" in status and re.search(r"fake\[fake\].*\(online", status):
                return
            time.sleep(0.05)
        raise TimeoutError(f"Kannel not ready after {timeout}s:\n{status}")

    def _read_fakesmsc(self) -> None:
        assert self._fakesmsc is not None and self._fakesmsc.stderr is not None
        for raw in self._fakesmsc.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            match = _GOT_MESSAGE.search(line)
            if not match:
                continue
            mt = _parse_mt(match.group(1), time.monotonic())
            if mt is not None:
                with self._mt_lock:
                    self._mt.append(mt)
                    self._mt_lock.notify_all()

    def inject_mo(self, from_number: str, to: str, text: str) -> None:
        """Hand a mobile-originated message to the fake SMSC, as if a phone had sent it."""
        if " " in from_number or " " in to:
            raise ValueError("numbers must not contain spaces")
        if text.isascii() and "\n" not in text and "\r" not in text:
            line = f"{from_number} {to} text {text}\n"
        else:
            encoded = urllib.parse.quote_from_bytes(text.encode("utf-16-be"), safe="")
            line = f"{from_number} {to} ucs2 {encoded}\n"
        # fakesmsc reads stdin with a 256-byte fgets; a longer line would be cut.
        if len(line.encode()) > 255:
            raise ValueError("message too long for one fakesmsc line")
        self._write_stdin(line.encode())

    def _write_stdin(self, data: bytes) -> None:
        assert self._fakesmsc is not None and self._fakesmsc.stdin is not None
        with self._stdin_lock:
            self._fakesmsc.stdin.write(data)
            self._fakesmsc.stdin.flush()

    def _tick(self) -> None:
        # fakesmsc select()s on stdin for up to a second before it reads the SMSC socket;
        # an empty line (which it ignores) every 50 ms makes it read MTs without that delay.
        while not self._stopping.wait(0.05):
            try:
                self._write_stdin(b"\n")
            except (BrokenPipeError, ValueError):
                return

    def wait_mt(self, predicate: Callable[[FakeMT], bool], timeout: float = 10.0) -> FakeMT:
        """The first MT the fake SMSC delivered that matches `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._mt_lock:
                for mt in self._mt:
                    if predicate(mt):
                        return mt
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching MT within {timeout}s; got {self._mt!r}")
                self._mt_lock.wait(remaining)

    @property
    def mt_messages(self) -> list[FakeMT]:
        """Every MT seen so far."""
        with self._mt_lock:
            return list(self._mt)

    def log(self, name: str = "bearerbox.log") -> str:
        """A log file's text, for failure messages."""
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop fakesmsc, smsbox and bearerbox (in that order) and remove the temp dir."""
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
