"""metergate's aiohttp service: auth, routes, upstream forwarding, the wallet store."""
