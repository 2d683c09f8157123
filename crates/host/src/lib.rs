//! The host (skeleton).
