"""The agent's REST API: the client the CLI uses, and the OpenAPI description."""
