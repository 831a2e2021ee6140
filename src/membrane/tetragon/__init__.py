"""Tetragon's event API as Python: `proto/` holds the protobuf definitions (the subset
Membrane uses, with Tetragon's package, names and numbers), and `make tetragon` generates
`membrane.tetragon.tetragon.tetragon_pb2` and `.events_pb2` from them (git-ignored build
outputs, like membrane.hubble's)."""
