"""Bytes over HTTP: libcurl's multi handle on the event loop, one Job per transfer, TLS trust."""
