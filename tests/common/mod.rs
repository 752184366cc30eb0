//! Helpers shared by the integration tests. Include with `mod common;` from a file in `tests/`.
//!
//! Each test binary compiles this module on its own and uses a different subset of it.
#![allow(
    dead_code,
    reason = "each test binary uses a different subset of the helpers"
)]
#![allow(
    clippy::panic,
    reason = "a test helper reports a broken setup by panicking"
)]

pub mod netns;
