"""Flow observability: the endpoint datapath's flow events as Hubble's flow.Flow messages
(membrane.hubble), kept in memory by the agent and streamed to `membrane observe`."""
