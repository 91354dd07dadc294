//! The reputation service's integration tests, one module per area, linked into one test binary (one link
//! and one ~50 MB binary instead of one per file).

mod commands;
mod common;
mod ingest;
mod liveness;
mod outcomes;
mod penalties;
mod projection;
