//! Host crate of the workspace's integration tests (`tests/`) and examples (`examples/`).
//! It has no API of its own; it compiles the README's examples as doctests.

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
