//! The library behind the `tributary` binary, so that tests can drive commands in process.
//!
//! What is here: [`bench`], the benchmark commands. What is not: argument parsing and printing,
//! which stay in `main.rs`.

pub mod bench;
