"""Events out: what happened to wallets, derived from their ledgers, delivered to signed webhook endpoints.

- `model`: `Event` and the event types;
- `derive`: the pure rules that turn ledger entries into events (thresholds included);
- `consumer`: the loop that finds wallets with new entries and derives their events, once;
- `delivery`: the loop that signs and posts events to each endpoint, with retries;
- `routes`: the admin API for endpoints, events and redelivery.
Redis is reached only through `proxy.store.events.EventStore`.
"""
