//! Criterion benches of the protocol core against rtrb, uhlc and bytemuck
//! copies. The same workloads feed the interleaved `report` binary.

use criterion::{Criterion, criterion_group, criterion_main};
use ringkernel::hlc::Hlc;
use ringkernel::id::ClockDomain;
use ringkernel_bench::*;

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_push_pop_64");
    let mut ours = RawRing::default();
    g.bench_function("ours", |b| b.iter(|| ours.run(1)));
    let mut base = RtrbRing::<64>::default();
    g.bench_function("rtrb", |b| b.iter(|| base.run(1)));
    g.finish();

    let mut g = c.benchmark_group("envelope_ring_128_doorbell");
    let mut ours = EnvelopeRing::default();
    g.bench_function("ours", |b| b.iter(|| ours.run(1)));
    let mut base = RtrbRing::<128>::default();
    g.bench_function("rtrb", |b| b.iter(|| base.run(1)));
    g.finish();
}

fn hlc(c: &mut Criterion) {
    let mut g = c.benchmark_group("hlc_tick");
    let ours = Hlc::new(ClockDomain::host(0));
    g.bench_function("ours", |b| b.iter(|| hlc_ours(&ours, 1)));
    let base = uhlc::HLC::default();
    g.bench_function("uhlc", |b| b.iter(|| hlc_uhlc(&base, 1)));
    g.finish();
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope_encode_decode");
    g.bench_function("ours", |b| b.iter(|| codec_ours(1)));
    g.bench_function("bytemuck", |b| b.iter(|| codec_bytemuck(1)));
    g.finish();
}

criterion_group!(benches, ring, hlc, codec);
criterion_main!(benches);
