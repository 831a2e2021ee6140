"""Runtime security (Tetragon class): the process lifecycle seen in the kernel, a process
cache with ancestry and pod attribution, and events in Tetragon's schema.

    process     ProcessEntry, exec_id: one process as the cache keeps it
    cache       ProcessCache: pid -> the process running now, exec_id -> any process
                still remembered, ancestry; bounded, garbage-collected after exits
    sink        EventSink: where every security event goes (store, followers, export)
    events      GetEventsResponse builders for process_exec / process_exit

Tracing policies (membrane.security.policy) post their events through the same sink and
name processes through the same cache: `cache.process(pid)`, `cache.parent(pid)`.
"""
