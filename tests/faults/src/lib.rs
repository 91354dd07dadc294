//! The fault tests live in `tests/`; they run the shipped service binaries (`deepnode-scheduler`,
//! `deepnode-reputation`, `deepnode-rotation`) as child processes, so this package has no code of
//! its own.
