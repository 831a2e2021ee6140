"""Control plane: how long the agent takes to enforce a policy change and to add or delete an
endpoint, and whether a node with 500 endpoints still works.

Everything runs against a real `membrane agent run` (its own node namespace, state
directory, API socket and pod-namespace prefix), driven through its REST API the way the
CLI drives it. A policy import returns when every affected endpoint's datapath enforces the
new revision, so the wall time of the API call is the time until enforced; right after it
returns, TCP connects between pods (and from an outside address) must show the new verdict
on their first SYN, or the benchmark fails.

Phases (each with a fresh agent):

  policy     1-rule changes, imports of 1,000 to 10,000 rules, 1-rule changes with the
             largest of them in force (a size predicted to take over --max-wait is skipped
             and reported as such)
  endpoints  adding (and deleting) 1 endpoint on an empty node, and 100 in a row
  scale      500 endpoints under a policy: adds, `membrane endpoint list`, sampled
             reachability, agent RSS, BPF map and program sizes, a policy change, and the
             endpoint plumbing test suite run while they exist

    python -m bench.control_plane [--phases policy,endpoints,scale] [--profile DIR] [--quick]

`--profile DIR` attaches py-spy to the agent during the expensive steps and writes the
folded stacks (DIR/<step>.txt) plus their hottest functions into the JSON (the sampler
costs the agent time: compare timings from runs without it). `--quick` runs every phase
at its smallest (a smoke test of the benchmark, not a measurement). Method and results:
bench/RESULTS.md, section control_plane.

Modules: `harness` (the agent of a phase, pods, probes, timed changes, teardown),
`policies` (the CiliumNetworkPolicy texts), `measure` (statistics, BPF footprint, py-spy),
one module per phase (`phase_policy`, `phase_endpoints`, `phase_scale`), `report` (the
summary on stderr) and `__main__` (the command line and the JSON).
"""
