//! TLS: the mesh CA, workload identity, and the rustls client and server configs.
