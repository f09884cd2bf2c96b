"""Shared fixtures for tests that run real components over loopback.

Fixtures
--------
``tls_material`` (session)
    :class:`support.TLSMaterial` -- CA, server, client, wrong-CA and
    hostname-mismatch certificates generated with ``openssl`` at session start.
``redis_server`` (session)
    One plain :class:`support.RedisServer` shared by the whole session.  Other
    tests see its data: use unique keys, or ``redis_factory`` when you need a
    pristine server (e.g. to compare exact ``INFO commandstats``).
``redis_factory`` (function)
    ``redis_factory(extra_args=(), *, password=None, username=None, tls=None,
    tls_auth_clients="no", server_cert=None, server_key=None) -> RedisServer``;
    starts a fresh server, stopped when the test ends.
``hot_path`` (function, parametrized)
    Runs a test twice: with the C hot path (``proxy._speedups``) and with the pure-Python one
    (``RESPMETER_PURE_PYTHON=1`` does the same for a whole process). Use it through
    ``pytestmark = pytest.mark.usefixtures("hot_path")`` in modules of sans-I/O tests.
``proxy_factory`` (function)
    ``proxy_factory(upstream, extra_args=(), *, env=None, command=None,
    log_level="debug", ready_timeout=15.0) -> ProxyProcess``; ``upstream`` is a
    URL or a RedisServer.  Started and ready; SIGTERMed (SIGKILLed if it does
    not exit in 10 s) when the test ends.  If the test failed, the tail of
    each proxy log is printed in the teardown section of the report.

Every process started through the helpers is also SIGKILLed at session end
(``pytest_sessionfinish``) and at interpreter exit (``atexit``).
"""

from __future__ import annotations

import shutil

import pytest

try:  # tests/ is a rootdir-less directory: pytest puts it on sys.path
    import support
except ImportError:  # pragma: no cover - if tests/ ever becomes a package
    from tests import support  # type: ignore[no-redef]

ProxyProcess = support.ProxyProcess
RedisServer = support.RedisServer
TLSMaterial = support.TLSMaterial
make_tls_material = support.make_tls_material

_REPORT_KEY = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    item.stash.setdefault(_REPORT_KEY, {})[rep.when] = rep
    return rep


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORT_KEY, {})
    return any(r.failed for r in reports.values())


@pytest.fixture(params=["C", "Python"])
def hot_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from proxy import resp

    if request.param == "C":
        if resp._speedups is None:
            pytest.skip("proxy._speedups is not built (or RESPMETER_PURE_PYTHON is set)")
    else:
        monkeypatch.setattr(resp, "_c_scan", None)
        monkeypatch.setattr(resp, "ReplyFramer", resp.PyReplyFramer)
    return request.param


def pytest_configure(config):
    # Nothing the suite starts may write into the user's own state: XDG_STATE_HOME (the default
    # --state-dir's parent) points at a temporary folder for the whole session, children included.
    import os
    import tempfile

    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="respmeter-test-state-")


def pytest_sessionfinish(session, exitstatus):
    support.kill_all_children()


def _require_binary(name: str) -> None:
    if shutil.which(name) is None:
        pytest.fail(f"{name!r} not found on PATH (apt-get install redis-server openssl)", pytrace=False)


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    _require_binary(support.OPENSSL_BIN)
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    _require_binary(support.REDIS_SERVER_BIN)
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis-session"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory):
    _require_binary(support.REDIS_SERVER_BIN)
    started: list[RedisServer] = []

    def factory(extra_args=(), **kwargs) -> RedisServer:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("redis"))
        server = RedisServer(extra_args, **kwargs)
        started.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def proxy_factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    started: list[ProxyProcess] = []

    def factory(upstream, extra_args=(), **kwargs) -> ProxyProcess:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("proxy"))
        proxy = ProxyProcess(upstream, extra_args, **kwargs)
        started.append(proxy)
        return proxy.start()

    try:
        yield factory
    finally:
        failed = _test_failed(request)
        for proxy in started:
            if proxy.is_running():
                try:
                    proxy.terminate(timeout=10)
                except TimeoutError as exc:
                    print(f"[proxy_factory] {exc}")
            if failed:
                print(f"\n===== {proxy!r} log ({proxy.log_path}) =====")
                print(support._tail(proxy.log_path, limit=20000))
