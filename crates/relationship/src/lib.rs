//! The replication relationship core (skeleton; see docs/formats/relationship.md).
