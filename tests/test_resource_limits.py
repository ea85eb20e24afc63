"""No request exhausts the daemon before it is authenticated: hostile name patterns, huge or
endless headers, silent and idle connections. Each attack runs against a real ``rebuildd
serve`` on 127.0.0.1, bounded in count and time, and the daemon must still answer ``GET /``
within 100 ms while its resident memory stays bounded."""

from __future__ import annotations

import resource
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from rebuildd import errors
from rebuildd.namefilter import MAX_EXPANSION, NameFilter, expansion
from tests.process import DaemonProcess

PROBE_LIMIT = 0.1  # seconds: the bound GET / must answer within, during and after an attack
RSS_GROWTH_LIMIT = 64 * 1024  # kB the daemon's resident memory may grow during an attack
ATTACK_LIMIT = 60.0  # seconds: an upper bound for one attack, not a performance assertion


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _probe(url: str) -> float:
    """Seconds a fresh connection's ``GET /`` took: the best of three (one scheduler hiccup of
    this shared machine is not the daemon's)."""
    host, port = url.removeprefix("http://").split(":")
    best = float("inf")
    for _ in range(3):
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=ATTACK_LIMIT) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = _read_all(sock)
        best = min(best, time.monotonic() - started)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    return best


def _during(attack: Callable[[], None], url: str) -> list[float]:
    """Run ``attack`` in a thread and probe ``GET /`` until it ends; the probe times."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            attack()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    probes: list[float] = []
    deadline = time.monotonic() + ATTACK_LIMIT
    while thread.is_alive() and time.monotonic() < deadline:
        probes.append(_probe(url))
        time.sleep(0.02)
    thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not thread.is_alive(), "the attack did not end"
    if failure:
        raise failure[0]
    probes.append(_probe(url))
    return probes


def _connect(daemon: DaemonProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", daemon.port), timeout=ATTACK_LIMIT)


def _read_all(sock: socket.socket) -> bytes:
    """What the daemon sends until it closes the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path)
    process.prepare()
    yield process
    process.stop()


class TestNameFilter:
    def test_exploding_repetitions_are_refused_before_compiling(
        self, daemon: DaemonProcess
    ) -> None:
        """Name patterns whose counted repetitions unroll to millions of nodes are a 400
        naming the bound, without stalling the daemon or growing its memory."""
        daemon.start()
        assert daemon.process is not None
        before = _rss_kb(daemon.process.pid)
        patterns = ["(?:a{1000}){1000}", "(a{1000}){1000}", "((a{100}){100}){100}"]
        answers: list[httpx.Response] = []

        def attack() -> None:
            with daemon.client() as client:
                for pattern in patterns * 3:
                    answers.append(client.get("/v2.1/servers", params={"name": pattern}))

        probes = _during(attack, daemon.url)
        assert [a.status_code for a in answers] == [400] * len(patterns) * 3
        assert "unroll" in answers[0].json()["badRequest"]["message"]
        assert max(probes) < PROBE_LIMIT, probes
        assert _rss_kb(daemon.process.pid) - before < RSS_GROWTH_LIMIT

    def test_too_long_a_pattern_is_refused(self, daemon: DaemonProcess) -> None:
        """A name pattern longer than a server name can be is a 400."""
        daemon.start()
        with daemon.client() as client:
            response = client.get("/v2.1/servers", params={"name": "(a)" * 100})
        assert response.status_code == 400
        assert "longer than 255" in response.json()["badRequest"]["message"]

    def test_catastrophic_matching_runs_off_the_event_loop(self, daemon: DaemonProcess) -> None:
        """A pattern that backtracks without end is a 400 after its time budget, and while
        it runs the daemon answers other requests at once."""
        daemon.start()
        with daemon.client() as client:
            image = client.get("/image/v2/images").json()["images"][0]["id"]
            body = {"server": {"name": "a" * 40 + "!", "imageRef": image, "flavorRef": "1"}}
            assert client.post("/v2.1/servers", json=body).status_code == 202
        answers: list[httpx.Response] = []

        def attack() -> None:
            with daemon.client() as client:
                for _ in range(8):
                    answers.append(client.get("/v2.1/servers", params={"name": "(a|aa)+$"}))

        probes = _during(attack, daemon.url)
        assert [a.status_code for a in answers] == [400] * 8
        assert "took too long" in answers[0].json()["badRequest"]["message"]
        assert max(probes) < PROBE_LIMIT, probes


class TestHeaders:
    def test_unterminated_huge_headers_are_cut_off(self, daemon: DaemonProcess) -> None:
        """50 connections each sending a 10 MB header that never ends get 431 once past the
        header limit, and the daemon's memory stays bounded."""
        daemon.start()
        assert daemon.process is not None
        before = _rss_kb(daemon.process.pid)
        socks = [_connect(daemon) for _ in range(50)]
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: ")
        chunk = b"a" * (1024 * 1024)
        answers: list[bytes] = []

        def attack() -> None:
            live = list(socks)
            for _ in range(10):  # 10 MB each
                for sock in list(live):
                    try:
                        sock.sendall(chunk)
                    except OSError:  # the daemon closed it
                        live.remove(sock)
            for sock in socks:
                answers.append(_read_all(sock))
                sock.close()

        probes = _during(attack, daemon.url)
        assert all(a.startswith(b"HTTP/1.1 431 ") for a in answers), {a[:40] for a in answers}
        assert max(probes) < PROBE_LIMIT, probes
        assert _rss_kb(daemon.process.pid) - before < RSS_GROWTH_LIMIT

    def test_too_many_header_fields_is_431(self, daemon: DaemonProcess) -> None:
        """A request with more header fields than the limit is 431 and its connection closed."""
        daemon.start(max_header_count="20")
        with _connect(daemon) as sock:
            fields = b"".join(b"X-%d: 1\r\n" % n for n in range(21))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 431 ")
        with _connect(daemon) as sock:
            fields = b"".join(b"X-%d: 1\r\n" % n for n in range(18))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


class TestConnections:
    def test_silent_slow_and_idle_connections_are_closed(self, daemon: DaemonProcess) -> None:
        """A connection that sends nothing, one whose headers never end, one whose body stops
        and one idle after its answer are each closed by the daemon after their timeout."""
        daemon.start(header_timeout="1", body_timeout="1", keep_alive_timeout="1")
        silent, slow, body, idle = (_connect(daemon) for _ in range(4))
        slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        body.sendall(
            b"POST /v2.1/servers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        idle.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _read_all(silent) == b""
        assert _read_all(slow) == b""
        assert _read_all(idle).startswith(b"HTTP/1.1 200 ")
        _read_all(body)  # closed (the app sees a disconnect)
        for sock in (silent, slow, body, idle):
            sock.close()

    def test_trickled_bodies_do_not_lock_out_clients(self, daemon: DaemonProcess) -> None:
        """Connections that hold every slot by sending request bodies a byte at a time are
        closed, longest-waiting first, to make room for a new client."""
        daemon.start(max_connections="20")
        socks = [_connect(daemon) for _ in range(20)]
        try:
            for sock in socks:
                sock.sendall(
                    b"POST /v2.1/servers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
                )
            assert _probe(daemon.url) < PROBE_LIMIT
            readable, _, _ = select.select(socks, [], [], 10)
            assert readable and all(_read_all(sock) == b"" for sock in readable)  # closed
        finally:
            for sock in socks:
                sock.close()

    def test_idle_sockets_beyond_the_descriptor_limit_do_not_lock_out_clients(
        self, daemon: DaemonProcess
    ) -> None:
        """1,100 idle connections to a daemon limited to 1,024 open files: the longest-idle
        ones are closed to make room, and a new client is answered at once."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard < 1500:
            pytest.skip(f"this test process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1500), hard))
        daemon.start(nofile=1024)
        assert daemon.process is not None
        before = _rss_kb(daemon.process.pid)
        socks: list[socket.socket] = []

        def attack() -> None:
            for _ in range(1100):
                socks.append(_connect(daemon))

        try:
            probes = _during(attack, daemon.url)
            probes.append(_probe(daemon.url))
        finally:
            for sock in socks:
                sock.close()
        assert max(probes) < PROBE_LIMIT, probes
        assert _rss_kb(daemon.process.pid) - before < RSS_GROWTH_LIMIT


class TestExpansionBound:
    def test_counts_multiply_everything_before_them_in_their_group(self) -> None:
        """The bound multiplies nested counts and never undercounts what a quantifier repeats."""
        assert 3 <= expansion("^web-[0-9]{1,3}$") < 100
        assert expansion("(a{1000}){1000}") >= 1_000_000
        assert expansion("(?:ab{100}){100}") >= 10_000
        assert expansion("[(]{5000}") >= 5000  # a parenthesis in a class opens no group
        assert expansion("(?#(){5000}") >= 5000  # nor one in a comment
        assert expansion("a{2}") == 2

    def test_ordinary_patterns_are_accepted_and_exploding_ones_refused(self) -> None:
        """Patterns a user filters names with pass; unrolling ones, overlong ones and verbose
        ones (whose comments could hide a group) are Invalid."""
        for ok in ("^web-[0-9]+$", r"\d{1,3}\.\d{1,3}", "^.{0,50}-.{0,50}$", "(?i)db"):
            NameFilter(ok)
        for bad in ("(?:a{100}){101}", "x" * 254 + "(a)", "(?x)a # (\n{9000}"):
            with pytest.raises(errors.Invalid):
                NameFilter(bad)
        assert expansion("(?:a{100}){101}") > MAX_EXPANSION
