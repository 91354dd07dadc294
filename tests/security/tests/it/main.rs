//! The security suite's integration tests, one module per area, linked into one test binary (one link
//! and one ~50 MB binary instead of one per file).

mod flood;
mod fuzz;
mod nats_permissions;
mod pg_roles;
mod services_under_nats_conf;
