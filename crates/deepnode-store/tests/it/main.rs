//! The event store's integration tests, one module per area, linked into one test binary (one link
//! and one ~50 MB binary instead of one per file).

mod append;
mod coordination;
mod linger;
mod log;
mod projection;
mod shared_reader;
mod tail;
