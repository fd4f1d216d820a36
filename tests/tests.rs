//! Integration tests: the real `halfsync` binary, real processes, real
//! shared memory, real dlopen'd plugins, over real sockets on 127.0.0.1.

mod support;

/// The core pipeline end to end: many connections pipelining echo
/// requests through Rust and C plugins, then a clean SIGTERM.
mod pipeline;

/// Malformed and abusive clients never disturb a well-behaved one.
mod bad_input;

/// Bad configs and bad plugins are refused with a one-line message.
mod bad_config;

/// The process tree: titles, worker restart, master death.
mod lifecycle;

/// Crash, hang and overload isolation: fault plugins under load.
mod faults;

/// 1,000+ crashes without leaks; respawn latency.
mod soak;

/// Live operations: reload, scale, status, metrics, logs.
mod ops;
