"""The composition root: the `fanout` command (cli), the local dev runner (dev) and the
embedded Valkey it and the tests start (embedded). It wires edge and ingest together, so
that neither `common` nor each other need to know the other."""
