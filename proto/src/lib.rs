//! # horn-proto: Horn's wire formats
//!
//! - [`wire`]: the binary data wire between an engine and its replicas (reads, writes,
//!   flushes, discards, pings), specified in `docs/wire-protocol.md`: fixed headers,
//!   many requests in flight, replies in any order, strict decoding;
//! - [`client`]: a blocking client of that wire, for tools and tests.
//!
//! Apart from the blocking client, this crate only encodes and decodes: no buffers
//! beyond a header, and no policy. It must never panic on bytes from the network.

#![warn(missing_docs)]

pub mod client;
pub mod wire;
