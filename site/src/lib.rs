//! gsb-site: the reference meeting site.
//!
//! A small real web app on PostgreSQL that stands in for the meeting service in the local
//! stack (`gsb up`) and the end-to-end tests: users, meetings (scheduled -> in_progress ->
//! ended), site config, custom pages, client versions and usage records, as a JSON API and
//! plain HTML pages. Every response carries `X-Gsb-Site: primary|backup`; the site answers
//! `detectbackup` with its own role; `/health/{web,meetings,api,db}` reflect real state, and
//! a fault switch (`/_faults`, only with `allow_faults`) breaks one component for drills.
//!
//! Invariants: the site starts and answers while its database is down (health red) and
//! reconnects by itself; it owns only its six tables, never the replicator's `gsb` schema;
//! keys are app-generated UUIDs and the schema has no foreign keys, so rows may be
//! replicated in any order.
#![forbid(unsafe_code)]

mod app;
mod db;
mod error;
mod faults;
mod html;
mod input;
mod model;
mod options;
mod server;

pub use error::Error;
pub use options::{ParseRoleError, Role, SiteOptions};
pub use server::{run, serve};
