"""The one boundary to NATS: names (layout), connecting, streams/KV/objects."""
