//! Shared HTTP cache (RFC 9111) for the outbound path. Owned by the cache work (issue 5).
