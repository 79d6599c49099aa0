//! gmem: create, map, place, inspect and migrate KVM guest_memfd-backed guest memory.
//!
//! Layers, bottom up: [`sys`] (the gmem-base crate, with all the unsafe code), [`numa`]
//! (nodes, numa_maps, pagemap), [`memory`] (guest_memfd, mappings, memslots, policy,
//! placement, another process's gmem), [`migrate`], [`probe`] (what the host can do),
//! [`foreign`] (stopping a VMM this process did not start).

#![forbid(unsafe_code)]

/// The OS layer (the gmem-base crate): every raw kernel call, and all the unsafe code.
pub use gmem_base as sys;

pub mod foreign;
pub mod memory;
pub mod migrate;
pub mod numa;
pub mod probe;
pub mod testing;
