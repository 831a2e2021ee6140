"""Support for tests and benchmarks that run Membrane for real: the agent as a subprocess,
pods and an outside host around it, reachability truth tables, traffic generators, the
trace tools as processes.

Plain modules without pytest (the fixtures stay in tests/integration), importable from
`pytest` and from `python -m bench.<name>` alike:

    agent         AgentProcess: one `membrane agent run` with everything of its own
    pods          Pod, an endpoint added through the API, the echo server, the outside host
    cluster       Cluster: the standard policy-test topology on one agent
    reachability  expected matrices of who may reach whom, probed and shown as tables
    traffic       sockets inside namespaces, first-SYN connect probes, listeners, iperf3,
                  new connections per second
    echo_server   the stdlib-only TCP/UDP echo server every pod runs (a script)
    connection_churn  the stdlib-only client of many short connections (a script)
    tracer        `membrane trace TOOL` started (once attached) and stopped as a user does
    cli           judging a refused `membrane` command (exit 2, one line); running one
                  without capabilities
    signals       children that get SIGINT/SIGQUIT at their default action, even under nohup
    waiting       polling for a condition instead of sleeping
"""
