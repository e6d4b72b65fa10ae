//! In-process cache (in progress).
