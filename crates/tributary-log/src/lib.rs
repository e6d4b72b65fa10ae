//! The durable, segmented log under every Tributary topic partition (work in progress).
