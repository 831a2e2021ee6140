"""Hubble's flow and observer API as Python: `proto/` holds the protobuf definitions (the
subset Membrane uses, with Hubble's names and numbers), and `make hubble` generates the
modules `membrane.hubble.flow.flow_pb2`, `membrane.hubble.observer.observer_pb2` (and
`_pb2_grpc`) and `membrane.hubble.relay.relay_pb2` from them (git-ignored build outputs,
like membrane.abi)."""

# The Observer API's unix socket, in the directory of the agent's REST socket.
HUBBLE_SOCKET_NAME = "hubble.sock"
