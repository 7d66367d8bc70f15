//! Domain types shared by the HTTP layer, the scheduler and storage.

pub mod job;
pub mod spec;
