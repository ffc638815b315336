"""Webhooks (a batchd extension): the SSRF policy (``policy``), Standard Webhooks signing
(``signing``), admin operations on endpoints and secrets (``manage``), and the outbox
delivery loop the worker runs (``delivery``). The outbox rows themselves are written by the
store, in the transaction that ends a batch."""
