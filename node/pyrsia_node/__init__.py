"""pyrsia_node: one asyncio process per pod that serves the Pyrsia network.

Layout (one job per module):
  config      typed settings from PYRSIA_* env and a YAML/TOML file
  genesis     the network's genesis file; generation of a whole local network
  identity    Ed25519 node key and node id
  tls         network CA and node certificates for mutual TLS between nodes
  store       content-addressed blob store (sha256), atomic and crash-safe
  metrics     psutil load sampler, Prometheus gauges, quality score Q(x)
  peering     gRPC Peer service: signed node info exchange, connected-peer table
  api/        aiohttp admin API (status, ledger) and health endpoints
  server      wiring: starts the pieces above, handles signals
  cli/        the `pyrsia` command (node, genesis, up, status, ...)
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
