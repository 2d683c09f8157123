//! Understudy's replication relationship core: one state machine per relationship, on both
//! hosts, with no I/O, no clock reads and no async runtime.
//!
//! - [`State`] is the one persisted state (Hyper-V names; no flag fields), [`Role`] the side
//!   this host plays, [`Relationship`] what the daemon holds in memory.
//! - [`step`] turns a relationship and an [`Event`] (a command from the API, or a fact the
//!   daemon observed) into the next relationship and the [`Action`]s to run, in order, or a
//!   [`Refusal`] that changes nothing. The daemon executes the actions and installs the new
//!   relationship only if every action up to and including [`Action::Persist`] succeeded.
//! - [`AutoResync`] says whether a required resynchronization starts by itself, and when
//!   ([`ResyncWindow`], UTC).
//! - [`health()`](fn@health) derives Normal / Warning / Critical; time is passed in.
//! - [`record`] is the persisted form (`docs/formats/relationship.md`, version 2) and the
//!   migration from version 1's flags.
//! - [`condition`] names the resynchronization trigger of a reason (Hyper-V's table).
//! - [`reconcile`](mod@reconcile) holds the reconcile rules of `docs/formats/peer-protocol.md`.

pub mod condition;
pub mod health;
pub mod reconcile;
pub mod record;
mod schedule;
mod state;
mod step;

pub use health::{health, HealthFacts};
pub use record::{migrate_v1, RecordError, RelationshipRecord};
pub use schedule::{AutoResync, ResyncWindow};
pub use state::{Resumable, Role, State};
pub use step::{
    step, Action, CycleKind, Event, EventKind, PeerRefusalFacts, Progress, Refusal, RefusalKind,
    Relationship, EXISTING_COPY_SEQ, INITIAL_FROM_EXISTING_REASON,
};
