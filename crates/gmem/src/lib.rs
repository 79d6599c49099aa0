//! gmem: create, map, place, inspect and migrate KVM guest_memfd-backed guest memory.
//!
//! Layers, bottom up: [`sys`] (the only unsafe code), [`numa`] (nodes, numa_maps, pagemap),
//! [`memory`] (guest_memfd, mappings, memslots, policy, placement, another process's gmem),
//! [`probe`] (what the host can do), [`foreign`] (stopping a VMM this process did not start).

pub mod sys;

pub mod foreign;
pub mod kvm;
pub mod memory;
pub mod migrate;
pub mod numa;
pub mod probe;
pub mod testing;
