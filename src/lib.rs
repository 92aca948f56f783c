//! # ringkernel — the protocol core
//!
//! ringkernel makes a *persistent GPU kernel* a first-class actor in actix,
//! ractor and kameo. This crate is the core every backend and adapter stands
//! on: the bytes and the lock-free protocols that host and device share.
//!
//! | module | what it holds |
//! |---|---|
//! | [`envelope`] | the 64-byte envelope header, `Pod` payloads inline, rkyv payloads for host/network |
//! | [`ring`] | the SPSC ring of fixed-size slots over caller-provided memory (H2K, K2H, K2K) |
//! | [`doorbell`] | the park/wake handshake a parked device loop sleeps on |
//! | [`control`] | the per-slot control block and the lifecycle state machine |
//! | [`hlc`] | the hybrid logical clock in one `u64` word |
//! | [`waiter`] | the preallocated waiter slab that matches replies to callers |
//! | [`id`] | actor ids, correlation ids, clock domains |
//! | [`layout`] | the C mirror of every shared struct (`device/include/ringkernel_protocol.h`) |
//! | [`kernel`] | kernel definitions: messages, state, handlers |
//! | [`backend`] | the extension point GPU backends plug into the runtime through |
//! | [`runtime`] | the host side: launch, asks and tells, the K2H poller, lifecycle, watchdog |
//! | [`home`] | an actor's identity across incarnations: fencing, replay, checkpoints |
//! | [`link`] | K2K links: a kernel's sends to another GPU actor, slot to slot |
//! | [`registry`] | one address space: mailboxes of CPU and GPU actors by id, topics with wildcards |
//! | [`conformance`] | the behaviours every backend must show, written once |
//!
//! The protocol is described byte by byte in `docs/protocol.md`.
//!
//! # Examples
//!
//! A ring between two threads, carrying envelopes:
//!
//! ```
//! use ringkernel::envelope::{EnvelopeHeader, Flags, HeaderCheck};
//! use ringkernel::id::ActorId;
//! use ringkernel::ring::{Ring, RingLayout};
//!
//! let layout = RingLayout::new(64, 128)?;
//! let (mut tx, mut rx) = Ring::new(layout);
//! let header = EnvelopeHeader::new(7, Flags::empty()).with_dst(ActorId::gpu(0, 3));
//! tx.try_send(&header, 42u64).expect("ring has room");
//!
//! let check = HeaderCheck::any_type(layout.max_payload());
//! let (got, value) = rx
//!     .try_recv_with(&check, |env| env.payload_as::<u64>().map(|v| (env.header, v)))
//!     .expect("one envelope is there")??;
//! assert_eq!((got.type_id, value), (7, 42));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("the ringkernel protocol is little-endian, as every GPU it targets");

#[cfg(not(ringkernel_loom))]
pub mod backend;
#[cfg(not(ringkernel_loom))]
pub mod conformance;
pub mod control;
#[cfg(not(ringkernel_loom))]
mod cpu;
pub mod doorbell;
#[cfg(all(feature = "fault-injection", not(ringkernel_loom)))]
pub mod drill;
pub mod envelope;
pub mod error;
pub mod hlc;
#[cfg(not(ringkernel_loom))]
pub mod home;
pub mod id;
#[cfg(all(feature = "fault-injection", not(ringkernel_loom)))]
pub mod inject;
#[cfg(not(ringkernel_loom))]
pub mod kernel;
#[cfg(not(ringkernel_loom))]
pub mod layout;
#[cfg(not(ringkernel_loom))]
pub mod link;
pub mod region;
#[cfg(not(ringkernel_loom))]
pub mod registry;
pub mod ring;
#[cfg(not(ringkernel_loom))]
pub mod runtime;
mod space;
mod sync;
pub mod waiter;

pub use error::{DecodeError, EncodeError, HlcError, LayoutError, StateError};
