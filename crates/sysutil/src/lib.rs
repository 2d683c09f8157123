//! Small system-call helpers (skeleton).
