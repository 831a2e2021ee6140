"""TracingPolicy (Tetragon's format) with selectors evaluated and actions taken in the
kernel.

    model       the policy documents, strictly validated (pydantic)
    parse       YAML text -> policies, every problem named by its field path
    tracefs     a tracepoint's record layout (the `format` file)
    elf         a uprobe symbol's file offset
    compile     policy -> one load-time configuration per hook (+ its map entries)
    loader      hook objects loaded, filled and attached; the cgroup sock_addr hooks
    manager     the agent's policies: apply, list, delete, persisted and re-applied
    events      kernel events -> Tetragon's process_tracepoint / process_uprobe
"""
