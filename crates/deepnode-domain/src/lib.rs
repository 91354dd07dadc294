//! deepnode's pure domain: the log's shapes, the events, and the policy (reputation, scoring,
//! placement, rotation) as deterministic functions of explicit inputs.
//!
//! Architecture invariant: this crate does no IO. It depends on no async runtime, database or broker
//! client and never reads the clock; time arrives inside events or as an argument. That is what lets
//! replay and audit reproduce every decision bit for bit.

pub mod book;
pub mod config;
pub mod ejection;
pub mod events;
pub mod execution;
pub mod fixed;
pub mod ids;
pub mod log;
pub mod merkle;
pub mod note;
pub mod penalties;
pub mod placement;
pub mod reputation;
pub mod rotation;
pub mod scoring;
pub mod wire;
