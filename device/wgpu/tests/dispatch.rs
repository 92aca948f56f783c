//! Dispatches executed on a real WebGPU adapter — in CI, Mesa's software
//! Vulkan driver (lavapipe), with `RINGKERNEL_REQUIRE_WGPU=1` so a missing
//! adapter fails instead of skipping. Elsewhere, without an adapter, each
//! test prints why it skipped.

mod common;
use common::*;
use ringkernel::envelope::{Envelope, EnvelopeHeader, Flags, HeaderCheck, encode_pod};
use ringkernel::id::{ActorId, ClockDomain, CorrelationId};
use ringkernel_wgpu::*;

const DOMAIN: ClockDomain = ClockDomain::unit(0, 9);

fn message(m: u32, ask: bool, hlc: u64, n: u64) -> [u8; SLOT_BYTES] {
    let header = EnvelopeHeader::new(1, if ask { Flags::ASK } else { Flags::empty() })
        .with_src(ActorId::cpu(0, 1))
        .with_dst(ActorId::gpu(0, 2))
        .with_correlation(if ask {
            CorrelationId::from_bits(0x0001_0000_0000_0000 | n)
        } else {
            CorrelationId::NONE
        })
        .with_stamp(hlc, ClockDomain::host(0))
        .with_seq(n + 1);
    let mut slot = [0u8; SLOT_BYTES];
    encode_pod(&mut slot, &header, &m).unwrap();
    slot
}

fn cell(words: usize) -> SlotCell {
    SlotCell {
        hlc: 0,
        domain: DOMAIN.to_bits(),
        fault: 0,
        state: vec![0; words],
    }
}

fn fold(ms: impl IntoIterator<Item = u32>) -> u32 {
    ms.into_iter()
        .fold(0u32, |s, m| s.wrapping_mul(31).wrapping_add(m))
}

#[test]
fn a_full_batch_is_served_in_order_and_every_message_counted() {
    let Some(dev) = device() else { return };
    let program = dev.compile(&FOLD).unwrap();
    // The longest batch one dispatch takes: a driver that cuts the loop
    // short would show as `LoopCut`, and reordering in the fold.
    let ms: Vec<u32> = (0..MAX_BATCH as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let batch: Vec<[u8; SLOT_BYTES]> = ms
        .iter()
        .enumerate()
        .map(|(i, &m)| message(m, i % 1000 == 999, 1000 + i as u64, i as u64))
        .collect();
    let mut cells = [cell(2)];
    let out = dev
        .dispatch(&program, 5_000, &mut cells, &[&batch])
        .unwrap();
    assert_eq!(out[0].processed, MAX_BATCH);
    assert_eq!(cells[0].state, [fold(ms.iter().copied()), MAX_BATCH as u32]);
    assert_eq!(cells[0].fault, 0);
    // Asks got replies, valid envelopes to their callers; tells did not.
    let check = HeaderCheck::any_type(64);
    for (i, reply) in out[0].messages.iter().map(|m| &m.reply).enumerate() {
        match reply {
            Some(slot) => {
                assert_eq!(i % 1000, 999, "only asks are answered");
                let env = Envelope::decode(slot, &check).unwrap();
                assert!(env.header.flags.contains(Flags::REPLY));
                assert_eq!(env.header.dst, ActorId::cpu(0, 1));
                assert_eq!(env.header.correlation.to_bits() & 0xFFFF_FFFF, i as u64);
                assert_eq!(env.header.clock_domain, DOMAIN);
                assert!(
                    env.header.hlc > 1000 + i as u64,
                    "the reply's stamp follows the ask's"
                );
                let [s, n]: [u32; 2] = env.payload_as().unwrap();
                assert_eq!((s, n), (fold(ms[..=i].iter().copied()), i as u32 + 1));
            }
            None => assert_ne!(i % 1000, 999, "ask {i} unanswered"),
        }
    }
    assert!(cells[0].hlc > 1000 + MAX_BATCH as u64);
}

#[test]
fn slots_in_one_dispatch_keep_their_own_state_and_the_next_dispatch_goes_on() {
    let Some(dev) = device() else { return };
    let program = dev.compile(&FOLD).unwrap();
    let a: Vec<_> = (0..500).map(|i| message(i, false, 1, i.into())).collect();
    let b: Vec<_> = (0..300)
        .map(|i| message(7 * i, false, 1, i.into()))
        .collect();
    let mut cells = [cell(2), cell(2)];
    dev.dispatch(&program, 1, &mut cells, &[&a, &b]).unwrap();
    assert_eq!(cells[0].state, [fold(0..500), 500]);
    assert_eq!(cells[1].state, [fold((0..300).map(|i| 7 * i)), 300]);
    // The state persists: a second dispatch continues the fold.
    let more: Vec<_> = (500..600).map(|i| message(i, false, 1, i.into())).collect();
    dev.dispatch(&program, 2, &mut cells[..1], &[&more])
        .unwrap();
    assert_eq!(cells[0].state, [fold(0..600), 600]);
}

#[test]
fn a_handler_fault_stops_its_slot_and_is_reported() {
    let Some(dev) = device() else { return };
    let program = dev.compile(&FOLD).unwrap();
    let batch: Vec<_> = [1, 2, 0xDEAD, 4]
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(m, true, 1, i as u64))
        .collect();
    let mut cells = [cell(2)];
    let out = dev.dispatch(&program, 1, &mut cells, &[&batch]).unwrap();
    assert_eq!(out[0].processed, 2, "served up to the fault");
    assert_eq!(cells[0].fault, RK_FAULT + 7);
    assert_eq!(cells[0].state, [fold([1, 2]), 2]);
    // A faulted slot serves nothing more.
    let out = dev
        .dispatch(&program, 1, &mut cells, &[&batch[3..]])
        .unwrap();
    assert_eq!(out[0].processed, 0);
}

#[test]
fn bad_input_is_a_typed_error() {
    let Some(dev) = device() else { return };
    let program = dev.compile(&FOLD).unwrap();
    let batch = vec![message(1, false, 1, 0); MAX_BATCH + 1];
    assert_eq!(
        dev.dispatch(&program, 1, &mut [cell(2)], &[&batch]),
        Err(WgpuError::BatchTooLarge {
            count: MAX_BATCH + 1,
            max: MAX_BATCH
        })
    );
    assert_eq!(
        dev.dispatch(&program, 1, &mut [cell(3)], &[&batch[..1]]),
        Err(WgpuError::StateSize { got: 3, want: 2 })
    );
}

#[test]
fn the_hlc_carries_across_the_word_boundary_and_saturates() {
    let Some(dev) = device() else { return };
    let program = dev.compile(&FOLD).unwrap();
    let check = HeaderCheck::any_type(64);
    for (sent, receipt) in [
        // Low word all ones: the merge (m + 1) carries into the high word.
        (0x0000_0001_FFFF_FFFF_u64, 0x0000_0002_0000_0000_u64),
        // At the horizon the word sticks.
        (u64::MAX, u64::MAX),
    ] {
        let mut cells = [cell(2)];
        let out = dev
            .dispatch(&program, 16, &mut cells, &[&[message(1, true, sent, 0)]])
            .unwrap();
        let reply = out[0].messages[0].reply.expect("an ask is answered");
        let env = Envelope::decode(&reply, &check).unwrap();
        // The reply is stamped one tick after the receipt.
        let expected = receipt.saturating_add(1);
        assert_eq!(env.header.hlc, expected, "sent {sent:#x}");
        assert_eq!(cells[0].hlc, expected);
    }
    // Physical time ahead of every stamp wins, without its logical bits.
    let mut cells = [cell(2)];
    let pt = 0x0000_0123_4567_89AB_u64;
    dev.dispatch(&program, pt, &mut cells, &[&[message(1, false, 5, 0)]])
        .unwrap();
    assert_eq!(cells[0].hlc, pt & !0xF);
}

/// Two dispatches in flight for one slot: the second takes the slot's cell
/// from the first on the device (chained), so it continues the fold where
/// the first left it, though the host submitted it before the first ran.
#[test]
fn a_chained_dispatch_continues_where_the_one_in_flight_left_off() {
    let Some(dev) = device() else { return };
    let program = dev.compile(&FOLD).unwrap();
    let first: Vec<u32> = (0..500).map(|i| i * 7 + 1).collect();
    let second: Vec<u32> = (0..500).map(|i| i * 13 + 5).collect();
    let batch = |ms: &[u32], from: u64| -> Vec<[u8; SLOT_BYTES]> {
        ms.iter()
            .enumerate()
            .map(|(i, &m)| message(m, true, 1000 + from + i as u64, from + i as u64))
            .collect()
    };
    let (a, b) = (batch(&first, 0), batch(&second, 500));
    let cells_a = [cell(2)];
    let pa = dev.submit(&program, 7, &cells_a, &[&a], &[None]).unwrap();
    // A stale host cell: only the chained copy may count.
    let stale = [SlotCell {
        state: vec![0xDEAD, 0xBEEF],
        ..cell(2)
    }];
    let pb = dev
        .submit(&program, 8, &stale, &[&b], &[Some((&pa, 0))])
        .unwrap();
    let mut cells_a = cells_a;
    let out_a = dev.wait(pa, &mut cells_a).unwrap();
    let mut cells_b = stale;
    let out_b = dev.wait(pb, &mut cells_b).unwrap();
    assert_eq!(out_a[0].processed, 500);
    assert_eq!(out_b[0].processed, 500);
    assert_eq!(cells_a[0].state, vec![fold(first.iter().copied()), 500]);
    let all = first.iter().chain(&second).copied();
    assert_eq!(cells_b[0].state, vec![fold(all), 1000]);
    // The second's replies continue the count.
    let last = out_b[0].messages[499].reply.expect("a reply");
    let check = HeaderCheck::only(64, &[1]);
    let reply = Envelope::decode(&last, &check).unwrap();
    let [_, n]: [u32; 2] = reply.payload_as().unwrap();
    assert_eq!(n, 1000);
}
