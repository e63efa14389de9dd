"""A metered call's life: the `Lease` that owns its money (`lease`), the
upstream HTTP call and whole answers (`upstream`), streamed answers
(`stream`) and their SSE framing (`sse`).

Every surface that spends a wallet goes through a `Lease`; forwarders report
what happened and never close a hold themselves.
"""
