"""A real Celery worker and producer talk to Redis only through the proxy (broker AND result
backend), and the proxy's metrics describe an idle worker's traffic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

try:
    import support
except ImportError:  # pragma: no cover
    from tests import support  # type: ignore[no-redef]

from support import commandstats, commandstats_delta

APP = textwrap.dedent(
    """
    import os
    from celery import Celery

    url = os.environ["RESPMETER_TEST_URL"]
    app = Celery("rmapp", broker=url, backend=url)

    @app.task
    def add(x, y):
        return {"sum": x + y, "pid": os.getpid()}
    """
)


def _upstream(proxy) -> dict[str, int]:
    return {k: int(v) for k, v in proxy.metric_sum("respmeter_upstream_commands_total").items() if v}


@pytest.mark.slow
def test_celery_worker_through_proxy(redis_factory, proxy_factory, tmp_path):
    server = redis_factory()
    proxy = proxy_factory(server)
    appdir = tmp_path / "app"
    appdir.mkdir()
    (appdir / "rmapp.py").write_text(APP)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(appdir) + os.pathsep + env.get("PYTHONPATH", "")
    env["RESPMETER_TEST_URL"] = proxy.url + "/0"
    env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp_path / "worker.log"
    obs = server.client()
    known = support.server_known_commands(obs)  # before the baseline: COMMAND LIST is counted too
    before = commandstats(obs)
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            support._deathsig_prefix()
            + [sys.executable, "-m", "celery", "-A", "rmapp", "worker", "--pool", "solo", "-c", "1",
               "--loglevel", "info"],
            cwd=appdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    support._register(worker)
    try:
        # the producer: a separate Celery app in this process, same URLs (through the proxy)
        sys.path.insert(0, str(appdir))
        old_url = os.environ.get("RESPMETER_TEST_URL")
        os.environ["RESPMETER_TEST_URL"] = env["RESPMETER_TEST_URL"]
        try:
            import importlib

            rmapp = importlib.import_module("rmapp")
        finally:
            sys.path.remove(str(appdir))
            if old_url is None:
                os.environ.pop("RESPMETER_TEST_URL", None)
            else:
                os.environ["RESPMETER_TEST_URL"] = old_url
        try:
            res = rmapp.add.delay(2, 40)
            value = res.get(timeout=30)
            assert value["sum"] == 42
            assert value["pid"] == worker.pid  # computed by the worker process (pool solo)
            res.forget()
            # a second task, to be sure the round trip is not a one-off
            assert rmapp.add.delay(1, 1).get(timeout=15)["sum"] == 2
        finally:
            rmapp.app.close()
        assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
        log_text = log_path.read_text(errors="replace")
        assert "rmapp.add" in log_text and "succeeded" in log_text, log_text[-3000:]

        # idle traffic of the worker alone
        time.sleep(0.5)
        u0 = _upstream(proxy)
        time.sleep(8)
        u1 = _upstream(proxy)
        idle = {k: u1.get(k, 0) - u0.get(k, 0) for k in u1 if u1.get(k, 0) - u0.get(k, 0) > 0}
        top = sorted(idle.items(), key=lambda kv: (-kv[1], kv[0]))
        print("idle traffic through the proxy:", top)
        assert {k for k, _ in top[:2]} == {"brpop", "publish"}, top
        assert idle["brpop"] >= 4, top  # BRPOP with a ~1 s timeout, again and again
        # every command the proxy counted reached the server. (Not an equality: kombu runs Lua
        # scripts whose inner commands the server counts too, and a BRPOP in flight is counted by the
        # proxy when sent but by the server only when it completes.)
        delta = commandstats_delta(before, commandstats(obs))
        # commands this server does not know (CLIENT SETINFO on Redis 7.0) are not in its commandstats
        up = {k: v for k, v in _upstream(proxy).items() if k in known}
        over = {k: (n, delta.get(k, 0)) for k, n in up.items() if n > delta.get(k, 0) + (2 if k == "brpop" else 0)}
        assert not over, over
        assert up.get("brpop", 0) >= delta.get("brpop", 0)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)
        support._unregister(worker)
    assert "Traceback" not in proxy.log_text()
