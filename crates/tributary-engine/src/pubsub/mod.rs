//! Pub/sub (in progress).
