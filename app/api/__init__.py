"""HTTP layer: routes parse, call one queue-service method, and shape the answer."""
