"""The node agent: endpoints, identities, policy and flows, served over a unix-socket REST
API and enforced by the endpoint datapath, whose pinned state outlives the agent."""
