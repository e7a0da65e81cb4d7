"""systemd's notify protocol (sd_notify) without libsystemd: datagrams to $NOTIFY_SOCKET.

`Type=notify` units wait for READY=1 before they count as started; `WatchdogSec=` expects
WATCHDOG=1 at least that often or restarts the service. The pings come from `Watchdog`, a
thread that sends them only while `alive()` says the pipeline is making progress, so a hung
worker stops them and systemd restarts the agent. Outside systemd (no NOTIFY_SOCKET) every
call is a no-op.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace (what systemd itself uses).
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """Send one datagram; False when not under systemd or the socket is gone."""
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")


class Watchdog(threading.Thread):
    """Pings WATCHDOG=1 every interval/4 while alive() holds; silent otherwise."""

    def __init__(self, notifier: Notifier, alive: Callable[[], bool], status: Callable[[], str]) -> None:
        super().__init__(name="systemd-watchdog", daemon=True)
        assert notifier.watchdog_interval is not None
        self.notifier = notifier
        self.period = notifier.watchdog_interval / 4
        self.alive = alive
        self.status = status
        self.stop_event = threading.Event()
        self.pings = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.period):
            if self.alive():
                self.notifier.send("WATCHDOG=1", f"STATUS={self.status()}")
                self.pings += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)
