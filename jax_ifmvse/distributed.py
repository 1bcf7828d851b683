"""Start-up of a multi-process extraction: who takes part, do they agree, and the one plan.

Extraction needs no cross-process collective: each process computes on its local devices and
writes its own journal files. What the processes must share is the start: every process
present once, the same job everywhere, one plan. That exchange runs over a plain TCP
connection to process 0 (JSON lines), not over jax.distributed: its coordination service aborts
the process (SIGABRT) when a peer stops sending heartbeats, which is exactly the case that must
end in a one-line error here. From join to plan, a thread of every process sends a keep-alive
line every quarter of the peer timeout, so the other side may spend minutes loading models yet a
stopped or hung process (SIGSTOP) is noticed after `timeout` seconds of silence. After the start, liveness goes through heartbeat files beside the
store (`featurestore.jobs`), so processes may finish minutes apart and none waits on a timeout.

The layout (coordinator, process count, process id) comes from the flags, or, with
`--distributed` and no flags, from the cluster environment that jax.distributed itself reads
(SLURM, Open MPI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from featurestore.jobs import JobError

__all__ = ["JobError", "Layout", "Session", "first_difference", "resolve_layout"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where process 0 listens, how many processes there are, and which one this is."""

    coordinator: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None


def resolve_layout(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    distributed: bool = False,
) -> Layout | None:
    """The job's layout from the flags or (with `distributed`) the cluster; None if single."""
    local = None
    if distributed:
        coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if distributed and None in (coordinator, num_processes, process_id):
        from jax._src import clusters  # the detection jax.distributed.initialize uses

        coordinator, num_processes, process_id, local = (
            clusters.ClusterEnv.auto_detect_unset_distributed_params(
                coordinator, num_processes, process_id, None, None, None
            )
        )
        if None in (coordinator, num_processes, process_id):
            missing = [
                flag
                for flag, v in (
                    ("--coordinator", coordinator),
                    ("--num-processes", num_processes),
                    ("--process-id", process_id),
                )
                if v is None
            ]
            raise JobError(
                "--distributed: no cluster environment found (SLURM or Open MPI variables);"
                f" give {' '.join(missing)}"
            )
    n = 1 if num_processes is None else int(num_processes)
    k = 0 if process_id is None else int(process_id)
    if n < 1 or not 0 <= k < n:
        raise JobError(f"--process-id {k} --num-processes {n}: need 0 <= process id < processes")
    if n == 1:
        return None
    if not coordinator or ":" not in coordinator:
        raise JobError(f"--coordinator {coordinator!r}: expected HOST:PORT of process 0")
    return Layout(str(coordinator), n, k, None if local is None else tuple(local))


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field (sorted) whose values differ between two fingerprints, or None."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key, a.get(key, "(absent)"), b.get(key, "(absent)")
    return None


def _keepalive(sock: socket.socket, timeout: float) -> None:
    """Let the kernel notice a peer host that vanished without closing the connection."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(timeout / 2))
    for opt, val in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", max(1, idle // 3)),
        ("TCP_KEEPCNT", 3),
    ):
        if hasattr(socket, opt):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


class _Peer:
    """One JSON-lines connection."""

    def __init__(self, sock: socket.socket, name: str, addr: str = ""):
        self.sock = sock
        self.name = name
        self.addr = addr.removeprefix("::ffff:")  # an IPv4 peer on a dual-stack socket
        self.buf = b""
        self._send = threading.Lock()  # the keep-alive thread and the main thread both send

    @property
    def pending(self) -> bool:
        """Whether a whole message already waits in the buffer (select would not say so)."""
        return b"\n" in self.buf

    def send(self, obj: Any) -> None:
        with self._send, contextlib.suppress(OSError):  # a peer gone already: its EOF says so
            self.sock.sendall((json.dumps(obj) + "\n").encode())

    def recv(self, deadline: float | None) -> Any:
        """The next message; None on EOF; TimeoutError past `deadline` (monotonic)."""
        while b"\n" not in self.buf:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                raise TimeoutError
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict):
            return {"error": f"{self.name} sent something that is not this protocol"}
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Session:
    """The start-up exchange of one process: `join()`, later `agree()`, then `close()`."""

    def __init__(self, layout: Layout, timeout: float = 60.0):
        self.layout = layout
        self.timeout = float(timeout)
        host, _, port = layout.coordinator.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._server: socket.socket | None = None
        self._peers: dict[int, _Peer] = {}  # process 0: peer id -> connection
        self._up: _Peer | None = None  # others: the connection to process 0
        self._lock = threading.Lock()  # guards _peers and _up against the keep-alive thread
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- both sides -----------------------------------------------------------------------

    def join(self) -> None:
        """Wait (up to the timeout) until all processes are connected with distinct ids."""
        if self.layout.process_id == 0:
            self._serve_join()
        else:
            self._connect()

    def agree(
        self, fingerprint: Mapping[str, Any], make_plan: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Compare every process's fingerprint; process 0 then runs `make_plan` and sends it."""
        if self.layout.process_id == 0:
            return self._serve_agree(dict(fingerprint), make_plan)
        assert self._up is not None
        self._up.send({"fingerprint": dict(fingerprint)})
        # Process 0 may still be loading its models: its keep-alives say it is alive meanwhile.
        reply = self._await("before the plan")
        if reply is None or "plan" not in reply:
            self.close()
            raise JobError(
                reply.get("error", f"process 0 ({self.layout.coordinator}) broke the protocol")
                if reply is not None
                else f"process 0 ({self.layout.coordinator}) left the job before the plan"
            )
        return reply["plan"]

    def abort(self, error: str) -> None:
        """Tell the others this process stops with `error` (best effort), then close."""
        msg = {"error": f"process {self.layout.process_id} failed: {error.splitlines()[0]}"}
        self._stop_beat()
        if self._up is not None:
            self._up.send(msg)
        for p in self._peers.values():
            p.send(msg)
        self.close()

    def close(self) -> None:
        """Close every connection and the listening socket."""
        self._stop_beat()
        with self._lock:
            conns = self._conns()
            self._peers.clear()
            self._up = None
        for p in conns:
            p.close()
        if self._server is not None:
            self._server.close()
            self._server = None

    def _conns(self) -> list[_Peer]:
        """Every open connection (hold `_lock`)."""
        return [*self._peers.values(), *([self._up] if self._up else [])]

    def _start_beat(self) -> None:
        """Send a keep-alive to every connection each quarter timeout, until `close()`."""
        every = max(0.05, self.timeout / 4)

        def loop() -> None:
            while not self._stop.wait(every):
                with self._lock:
                    conns = self._conns()
                for p in conns:
                    p.send({"alive": 1})

        self._beat = threading.Thread(target=loop, name="ifmvse-keepalive", daemon=True)
        self._beat.start()

    def _stop_beat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None

    # -- process 0 ------------------------------------------------------------------------

    def _fail(self, error: str) -> NoReturn:
        self._stop_beat()
        for p in self._peers.values():
            p.send({"error": error})
        self.close()
        raise JobError(error)

    def _listen(self) -> socket.socket:
        try:
            if socket.has_dualstack_ipv6():
                return socket.create_server(
                    ("", self.port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64
                )
            return socket.create_server(("", self.port), backlog=64)
        except OSError as e:
            raise JobError(
                f"--coordinator {self.layout.coordinator}: process 0 cannot listen on port"
                f" {self.port} ({e.strerror or e}); is another process 0 running?"
            ) from None

    def _add(self, k: int, peer: _Peer) -> None:
        with self._lock:
            self._peers.setdefault(k, peer)

    def _accept(self, deadline: float) -> None:
        """Accept one connection and read its hello; registers it or fails the job."""
        assert self._server is not None
        sock, addr = self._server.accept()
        _keepalive(sock, self.timeout)
        peer = _Peer(sock, "a process", str(addr[0]))
        try:
            hello = peer.recv(min(deadline, time.monotonic() + min(10.0, self.timeout)))
            k, n = int(hello["hello"]), int(hello["num_processes"])
        except (TimeoutError, KeyError, TypeError, ValueError):
            # Not one of ours (a port scan, a stray client): turn it away, the job goes on.
            peer.close()
            return
        peer.name = f"process {k}"
        if n != self.layout.num_processes:
            self._add(-len(self._peers) - 1, peer)
            self._fail(
                f"processes disagree on num_processes: process 0 has"
                f" {self.layout.num_processes}, process {k} has {n}"
            )
        if not 0 < k < self.layout.num_processes:
            peer.send(
                {"error": f"--process-id {k}: must lie in 1..{self.layout.num_processes - 1}"}
            )
            peer.close()
            return
        if k in self._peers:
            self._add(-len(self._peers) - 1, peer)
            self._fail(
                f"process id {k} given twice (from {self._peers[k].addr} and {peer.addr});"
                " every process needs its own --process-id"
            )
        self._add(k, peer)

    def _serve_join(self) -> None:
        self._server = self._listen()
        self._start_beat()  # the joined ones wait for the others: tell them process 0 lives
        deadline = time.monotonic() + self.timeout
        want = self.layout.num_processes - 1
        while len(self._peers) < want:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._server], [], [], max(0.0, left))
            if not ready:
                absent = sorted(set(range(1, want + 1)) - set(self._peers))
                self._fail(
                    f"processes {absent} did not join within {self.timeout:.0f} s"
                    f" (coordinator {self.layout.coordinator}; see --peer-timeout)"
                )
            self._accept(deadline)
        # Catch a duplicate id that connected at about the same time as the original.
        settle = time.monotonic() + min(1.0, self.timeout / 10)
        while select.select([self._server], [], [], max(0.0, settle - time.monotonic()))[0]:
            self._accept(deadline)
        for p in self._peers.values():
            p.send({"joined": self.layout.num_processes})

    def _read_agree(self, k: int, prints: dict[int, dict[str, Any]]) -> None:
        """Read what process k sent (keep-alives, its fingerprint); fails the job on an error."""
        peer = self._peers[k]
        while True:
            try:
                msg = peer.recv(time.monotonic() + self.timeout)
            except TimeoutError:
                self._fail(
                    f"process {k} sent part of a message, then nothing for"
                    f" {self.timeout:.0f} s (see --peer-timeout)"
                )
            if msg is None:
                self._fail(f"process {k} left the job before agreeing on it (see its output)")
            if "error" in msg:
                self._fail(str(msg["error"]))
            if isinstance(msg.get("fingerprint"), dict):
                prints[k] = msg["fingerprint"]
            elif "alive" not in msg:
                self._fail(f"process {k} sent something that is not this protocol")
            if not peer.pending:
                return

    def _serve_agree(
        self, mine: dict[str, Any], make_plan: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        assert self._server is not None
        prints: dict[int, dict[str, Any]] = {}
        # Keep-alives sent while this process loaded its models wait in the socket buffers:
        # silence counts from now. A peer silent for `timeout` (stopped, hung) fails the job.
        seen = dict.fromkeys(self._peers, time.monotonic())
        while len(prints) < len(seen):
            live = {self._peers[k].sock: k for k in seen}
            wait = min(seen.values()) + self.timeout - time.monotonic()
            ready, _, _ = select.select([self._server, *live], [], [], max(0.0, wait))
            for s in ready:
                if s is self._server:
                    self._accept(time.monotonic() + self.timeout)  # late duplicates fail the job
                    continue
                self._read_agree(live[s], prints)
                seen[live[s]] = time.monotonic()
            now = time.monotonic()
            stale = [k for k, t in sorted(seen.items()) if now - t >= self.timeout]
            # One that became readable meanwhile (a stray client held us up) is read first.
            if stale and not select.select([self._peers[k].sock for k in stale], [], [], 0)[0]:
                self._fail(
                    f"process {stale[0]} sent nothing for {now - seen[stale[0]]:.0f} s while"
                    " process 0 waited for every fingerprint; is it stopped or hung?"
                    " (see --peer-timeout)"
                )
        for k in sorted(prints):
            diff = first_difference(mine, prints[k])
            if diff is not None:
                field, a, b = diff
                self._fail(f"processes disagree on {field}: process 0 has {a}, process {k} has {b}")
        try:
            plan = make_plan()
        except Exception as e:
            with contextlib.suppress(JobError):
                self._fail(f"process 0 failed: {str(e).splitlines()[0] if str(e) else e!r}")
            raise
        self._stop_beat()  # after the plan nobody waits on process 0 any more
        for p in self._peers.values():
            p.send({"plan": plan})
        # Wait for each peer to have read the plan (or gone) before the listener closes.
        for p in list(self._peers.values()):
            reply: Any = {"alive": 1}
            with contextlib.suppress(TimeoutError):
                while reply is not None and "alive" in reply:
                    reply = p.recv(time.monotonic() + self.timeout)
            if reply and "error" in reply:  # e.g. it cannot read the plan file
                self._fail(str(reply["error"]))
        self.close()
        return plan

    # -- processes 1.. --------------------------------------------------------------------

    def _await(self, when: str) -> Any:
        """The next message from process 0 that is not a keep-alive; JobError after silence."""
        assert self._up is not None
        while True:
            try:
                msg = self._up.recv(time.monotonic() + self.timeout)
            except TimeoutError:
                error = (
                    f"process 0 ({self.layout.coordinator}) sent nothing for"
                    f" {self.timeout:.0f} s {when}; is it stopped or hung? (see --peer-timeout)"
                )
                self.abort(error)
                raise JobError(error) from None
            if msg is None or "alive" not in msg:
                return msg

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=5.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise JobError(
                        f"could not reach process 0 at {self.layout.coordinator} within"
                        f" {self.timeout:.0f} s (see --peer-timeout)"
                    ) from None
                time.sleep(0.2)
        sock.settimeout(None)
        _keepalive(sock, self.timeout)
        self._up = _Peer(sock, "process 0")
        self._up.send({"hello": self.layout.process_id, "num_processes": self.layout.num_processes})
        # Process 0 enforces the join timeout and says so; while it waits for the others its
        # keep-alives come, so only a process 0 that is gone, stopped or hung meets our timeout.
        reply = self._await("before all processes joined")
        if reply is None:
            reply = {"error": f"process 0 ({self.layout.coordinator}) closed the connection"}
        if "joined" not in reply:
            self.close()
            raise JobError(
                str(reply.get("error", f"process 0 ({self.layout.coordinator}) broke the protocol"))
            )
        self._start_beat()  # we load models now; process 0 must know we are alive meanwhile

    def ack(self) -> None:
        """Tell process 0 the plan arrived (so it may close), then close."""
        self._stop_beat()
        if self._up is not None:
            self._up.send({"ack": True})
        self.close()
