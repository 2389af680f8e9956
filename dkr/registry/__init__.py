"""What to fetch: references, logins and tokens, the v2 (OCI) and v1 registry protocols."""
