"""`membrane trace`: bcc/bpftrace-class tracing tools on stable kernel hooks (CO-RE, no
kernel headers at run time). Each tool lives in `tools/<name>.py` and is found there."""
