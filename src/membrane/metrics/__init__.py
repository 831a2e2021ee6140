"""Prometheus metrics with Cilium's and Hubble's names and labels: the agent's
(`--prometheus-serve-addr`, cilium_*) and the flows' (`--hubble-metrics-server`, hubble_*).

Collectors read at scrape time what the kernel and the agent's published snapshot hold;
flow counts are kept by the flow reader's thread in plain dictionaries, so counting a
flow takes no lock.
"""
