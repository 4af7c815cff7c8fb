//! NATS JetStream glue for idem (placeholder docs, rewritten below).
#![forbid(unsafe_code)]

mod dead_letter;
mod error;
mod glue;
mod progress;
mod telemetry;

pub use dead_letter::headers;
pub use error::Error;
pub use glue::{Glue, Settled};
pub use telemetry::BROKER;
