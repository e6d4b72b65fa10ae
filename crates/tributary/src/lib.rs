//! The library behind the `tributary` binary, so that tests can drive commands in process.
//!
//! What is here: [`platform`], `tributary up` (the engine, the systems, the front door);
//! [`bench`], the benchmark commands. What is not: argument parsing and printing, which stay in
//! `main.rs`.

pub mod bench;
pub mod platform;
