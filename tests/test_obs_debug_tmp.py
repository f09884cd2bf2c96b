from test_observability import *  # noqa
from test_observability import stack  # noqa

def test_debug(stack):
    p = stack.prom
    body = p.api("query", query='respmeter_commands_total{command="set"}[30s]')
    for r in body["data"]["result"]:
        print(r["metric"].get("instance"), r["values"])
    print(p.query('rate(respmeter_command_duration_seconds_count[1m])'))
    print(p.query('up'))
    print(p.query('prometheus_target_interval_length_seconds'))
    assert False
