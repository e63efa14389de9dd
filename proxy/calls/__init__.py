"""A metered call's lifecycle: admission, forwarding, relaying and settling."""
