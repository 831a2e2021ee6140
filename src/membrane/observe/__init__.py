"""Flow observability: the endpoint datapath's flow events as Hubble-like flow records,
kept in memory by the agent and streamed to `membrane observe`."""
