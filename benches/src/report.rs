//! The bench report: each comparison runs ours and the baseline interleaved
//! (A B A B …) in one process and prints
//!
//! ```text
//! NAME ours=<median> base=<median> ratio=<ours/base> cpu_ours=… cpu_base=… [configuration]
//! ```
//!
//! as time per operation (lower is better). CPU time is the process's
//! (all threads), per operation.
//!
//! Each comparison of the main list runs in a fresh child process (the
//! same binary with `--only=NAME`) that builds only the actors it measures,
//! so none runs on the heap and threads the others leave behind (in one
//! process, the native actix tell read 262 ns after other comparisons and
//! 453 ns alone). `--in-process` runs them all in one process instead.
//!
//! `cargo run --release -p ringkernel-bench --bin report -- --quick`
//! (under two minutes); without `--quick` it runs more and longer rounds.
//! A further argument filters comparisons by name.

use ringkernel::hlc::Hlc;
use ringkernel::id::ClockDomain;
use ringkernel_bench::*;
use ringkernel_bench::{actors, cuda, faults, k2k, pipeline, wgpu};
use std::cell::{LazyCell, RefCell};
use std::time::{Duration, Instant};

fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and CPU time per operation of one run of `n` operations.
fn measure(n: u64, f: &mut dyn FnMut(u64)) -> (f64, f64) {
    let (w0, c0) = (Instant::now(), cpu_now());
    f(n);
    let (w, c) = (w0.elapsed(), cpu_now() - c0);
    (
        w.as_nanos() as f64 / n as f64,
        c.as_nanos() as f64 / n as f64,
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1_000_000.0 {
        format!("{:.3}ms", ns / 1_000_000.0)
    } else if ns >= 1_000.0 {
        format!("{:.3}us", ns / 1_000.0)
    } else {
        format!("{ns:.2}ns")
    }
}

struct Comparison<'a> {
    name: &'static str,
    config: String,
    ops: u64,
    ours: Box<dyn FnMut(u64) + 'a>,
    base: Box<dyn FnMut(u64) + 'a>,
}

fn run(c: &mut Comparison<'_>, rounds: usize) {
    // Warm up both.
    (c.ours)(c.ops / 10 + 1);
    (c.base)(c.ops / 10 + 1);
    let (mut ow, mut oc, mut bw, mut bc) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (w, cpu) = measure(c.ops, &mut *c.ours);
        ow.push(w);
        oc.push(cpu);
        let (w, cpu) = measure(c.ops, &mut *c.base);
        bw.push(w);
        bc.push(cpu);
    }
    let (o, b) = (median(&mut ow), median(&mut bw));
    println!(
        "{} ours={} base={} ratio={:.3} cpu_ours={} cpu_base={} [{}; {} rounds x {} ops, interleaved]",
        c.name,
        fmt_ns(o),
        fmt_ns(b),
        o / b,
        fmt_ns(median(&mut oc)),
        fmt_ns(median(&mut bc)),
        c.config,
        rounds,
        c.ops
    );
}

/// A comparison of single events (a restart, a detection): `samples` of
/// each, interleaved, medians printed in the same line format.
fn run_samples(
    name: &str,
    config: &str,
    samples: usize,
    ours: &mut dyn FnMut() -> Duration,
    base: &mut dyn FnMut() -> Duration,
) {
    let (mut o, mut b) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        o.push(ours().as_nanos() as f64);
        b.push(base().as_nanos() as f64);
    }
    let (mo, mb) = (median(&mut o), median(&mut b));
    println!(
        "{name} ours={} base={} ratio={:.3} p90_ours={} p99_ours={} [{config}; median of {samples} samples each, interleaved]",
        fmt_ns(mo),
        fmt_ns(mb),
        mo / mb,
        fmt_ns(o[o.len() * 9 / 10]),
        fmt_ns(o[o.len() * 99 / 100])
    );
}

/// Runs comparison `name` in a child process of its own (the same binary,
/// `--only=NAME`), its output going straight to ours. False when the child
/// could not run or failed.
fn run_child(name: &str, quick: bool) -> bool {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let status = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .args(quick.then_some("--quick"))
            .arg(format!("--only={name}"))
            .status()
    });
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => {
            eprintln!("report: the child running {name} ended with {s}");
            false
        }
        Err(e) => {
            eprintln!("report: could not start a child for {name}: {e}");
            false
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned();
    // `--only=NAME`: this process is a child that runs that one comparison
    // of the main list and nothing else.
    let only = args
        .iter()
        .find_map(|a| a.strip_prefix("--only="))
        .map(str::to_owned);
    // `--in-process`: run the main list in this process, one after another,
    // as the report did before it had children.
    let in_process = args.iter().any(|a| a == "--in-process");
    let mut report_failed = false;
    let (rounds, scale) = if quick { (15, 1) } else { (41, 4) };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if only.is_none() {
        println!(
            "# ringkernel bench report: {} rounds per comparison, {cpus} CPUs, {}, {}",
            rounds,
            if quick { "--quick" } else { "full" },
            if in_process {
                "one process"
            } else {
                "a process per comparison of the main list"
            }
        );
    }

    let mut raw = RawRing::default();
    let mut rtrb64 = RtrbRing::<64>::default();
    let mut env = EnvelopeRing::default();
    let mut rtrb128 = RtrbRing::<128>::default();
    let ours_hlc = Hlc::new(ClockDomain::host(0));
    let uhlc = uhlc::HLC::default();
    // Built on first use: a child running one comparison starts only the
    // actors that comparison asks.
    let ractor_pair = LazyCell::new(actors::RactorPair::new);
    let core_pair = LazyCell::new(|| RefCell::new(actors::CorePair::new()));
    let actix_pair = LazyCell::new(actors::ActixPair::new);
    let kameo_pair = LazyCell::new(actors::KameoPair::new);
    let pipelines = LazyCell::new(|| RefCell::new(pipeline::Pipelines::new()));
    let k2k_pair = LazyCell::new(|| RefCell::new(k2k::K2kPair::new()));
    let linked = LazyCell::new(|| RefCell::new(pipeline::Pipelines::linked()));

    let mut comparisons = vec![
        Comparison {
            name: "ring_push_pop_64",
            config: format!("one thread, push then pop, 64-byte slots, capacity {CAPACITY}; base rtrb [u8; 64]"),
            ops: 2_000_000 * scale,
            ours: Box::new(|n| raw.run(n)),
            base: Box::new(|n| rtrb64.run(n)),
        },
        Comparison {
            name: "envelope_ring_128_doorbell",
            config: format!(
                "one thread, encode+publish+doorbell check, then validate+decode; 128-byte slots, capacity {CAPACITY}; base rtrb [u8; 128] push+pop"
            ),
            ops: 2_000_000 * scale,
            ours: Box::new(|n| env.run(n)),
            base: Box::new(|n| rtrb128.run(n)),
        },
        Comparison {
            name: "ring_two_thread_128",
            config: format!(
                "producer and consumer threads pinned to cpus 0 and 1 ({cpus} cpus), 128-byte envelopes, no doorbell; base rtrb [u8; 128]"
            ),
            ops: 1_000_000 * scale,
            ours: Box::new(|n| two_thread_ours(n, Bell::None)),
            base: Box::new(two_thread_rtrb),
        },
        Comparison {
            name: "ring_two_thread_128_doorbell",
            config: "as ring_two_thread_128 with a doorbell check (SeqCst fence) after every message; base rtrb [u8; 128]".to_string(),
            ops: 1_000_000 * scale,
            ours: Box::new(|n| two_thread_ours(n, Bell::PerMessage)),
            base: Box::new(two_thread_rtrb),
        },
        Comparison {
            name: "ring_two_thread_128_doorbell_batch32",
            config: "as ring_two_thread_128 publishing batches of up to 32 with one doorbell check each; base rtrb [u8; 128] one by one".to_string(),
            ops: 1_000_000 * scale,
            ours: Box::new(|n| two_thread_ours(n, Bell::Batch(32))),
            base: Box::new(two_thread_rtrb),
        },
        Comparison {
            name: "hlc_tick",
            config: "one thread, Hlc::tick over the default TSC clock; base uhlc::HLC::new_timestamp with its default clock".into(),
            ops: 1_000_000 * scale,
            ours: Box::new(|n| hlc_ours(&ours_hlc, n)),
            base: Box::new(|n| hlc_uhlc(&uhlc, n)),
        },
        Comparison {
            name: "envelope_encode_decode",
            config: "64-byte header + 64-byte Pod payload into a 128-byte slot, validating decode; base bytemuck copy of the same bytes both ways".into(),
            ops: 2_000_000 * scale,
            ours: Box::new(codec_ours),
            base: Box::new(codec_bytemuck),
        },
        Comparison {
            name: "runtime_ask_core",
            config: "a plain thread asks a GPU actor slot (cpu backend) and blocks on a std channel; base: the same round trip to an echo thread over std sync_channels".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| core_pair.borrow_mut().slot_asks(n)),
            base: Box::new(|n| core_pair.borrow_mut().echo_thread_round_trips(n)),
        },
        Comparison {
            name: "ractor_ask",
            config: "sequential asks from a tokio task (2 workers): GpuActorRef::ask(Echo) to a GPU actor on the cpu backend; base ractor call! to a native actor".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| ractor_pair.gpu_asks(n)),
            base: Box::new(|n| ractor_pair.native_calls(n)),
        },
        Comparison {
            name: "ractor_tell",
            config: "n tells then one ask that sees them processed: GpuActorRef::tell(Add) vs ractor cast! to a native actor; time per tell".into(),
            ops: 200_000 * scale,
            ours: Box::new(|n| ractor_pair.gpu_tells(n)),
            base: Box::new(|n| ractor_pair.native_casts(n)),
        },
        Comparison {
            name: "ractor_ask_vs_handoff",
            config: "as ractor_ask; base: call! to a native actor that hands each message to a thread of its own over a std channel, which answers the port (three threads, as ours)".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| ractor_pair.gpu_asks(n)),
            base: Box::new(|n| ractor_pair.handoff_calls(n)),
        },
        Comparison {
            name: "ractor_tell_vs_handoff",
            config: "as ractor_tell; base: cast! to a native actor that hands each message to a thread of its own over a std channel (three threads, as ours)".into(),
            ops: 200_000 * scale,
            ours: Box::new(|n| ractor_pair.gpu_tells(n)),
            base: Box::new(|n| ractor_pair.handoff_casts(n)),
        },
        Comparison {
            name: "actix_ask",
            config: "sequential asks from the actix system thread: addr.send(Ask(Echo)) to a GPU actor (cpu backend) on its own arbiter; base addr.send to a native actor on its own arbiter".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| actix_pair.gpu_asks(n)),
            base: Box::new(|n| actix_pair.native_asks(n)),
        },
        Comparison {
            name: "actix_tell",
            config: "n do_send tells then one ask that sees them processed: Tell(Add) to a GPU actor vs a native actor, each on its own arbiter; time per tell".into(),
            ops: 200_000 * scale,
            ours: Box::new(|n| actix_pair.gpu_tells(n)),
            base: Box::new(|n| actix_pair.native_tells(n)),
        },
        Comparison {
            name: "kameo_ask",
            config: "sequential asks from a tokio task (2 workers): ask(Ask(Echo)) to a GPU actor (cpu backend) vs ask to a native kameo actor".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| kameo_pair.gpu_asks(n)),
            base: Box::new(|n| kameo_pair.native_asks(n)),
        },
        Comparison {
            name: "actix_ask_vs_handoff",
            config: "as actix_ask; base: addr.send to a native actor that hands each message to a thread of its own over a std channel and answers through a ResponseFuture awaiting that thread's oneshot (three threads, as ours)".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| actix_pair.gpu_asks(n)),
            base: Box::new(|n| actix_pair.handoff_asks(n)),
        },
        Comparison {
            name: "actix_tell_vs_handoff",
            config: "as actix_tell; base: do_send to a native actor that hands each message to a thread of its own over a std channel (three threads, as ours)".into(),
            ops: 200_000 * scale,
            ours: Box::new(|n| actix_pair.gpu_tells(n)),
            base: Box::new(|n| actix_pair.handoff_tells(n)),
        },
        Comparison {
            name: "kameo_ask_vs_handoff",
            config: "as kameo_ask; base: ask to a native kameo actor that hands each message to a thread of its own over a std channel and awaits that thread's oneshot (three threads, as ours)".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| kameo_pair.gpu_asks(n)),
            base: Box::new(|n| kameo_pair.handoff_asks(n)),
        },
        Comparison {
            name: "pipeline_one_at_a_time",
            config: "ingest → stage → stage → sink, one reading at a time (each waits for the sink): the two stages GPU actors (cpu backend) sending to the next by id, routed by the poller; base the same pipeline of native ractor actors casting to the next; end-to-end time per reading".into(),
            ops: 5_000 * scale,
            ours: Box::new(|n| pipelines.borrow_mut().gpu_one_at_a_time(n)),
            base: Box::new(|n| pipelines.borrow_mut().native_one_at_a_time(n)),
        },
        Comparison {
            name: "pipeline_flood",
            config: "as pipeline_one_at_a_time, n readings sent at once then all received; time per reading (throughput)".into(),
            ops: 50_000 * scale,
            ours: Box::new(|n| pipelines.borrow_mut().gpu_flood(n)),
            base: Box::new(|n| pipelines.borrow_mut().native_flood(n)),
        },
        Comparison {
            name: "pipeline_k2k_one_at_a_time",
            config: "as pipeline_one_at_a_time with stage 1 linked to stage 2 by K2K (slot to slot, no poller on that hop); base the native ractor pipeline".into(),
            ops: 5_000 * scale,
            ours: Box::new(|n| linked.borrow_mut().gpu_one_at_a_time(n)),
            base: Box::new(|n| linked.borrow_mut().native_one_at_a_time(n)),
        },
        Comparison {
            name: "pipeline_k2k_flood",
            config: "as pipeline_flood with stage 1 linked to stage 2 by K2K; time per reading (throughput)".into(),
            ops: 50_000 * scale,
            ours: Box::new(|n| linked.borrow_mut().gpu_flood(n)),
            base: Box::new(|n| linked.borrow_mut().native_flood(n)),
        },
        Comparison {
            name: "k2k_one_way",
            config: "a source kernel's handler sends n values (256 per message it is told) over a K2K link to a sink kernel, both cpu-backend GPU actors on their own device threads, until the sink has them all; base rtrb [u8; 128] between two pinned threads; time per message".into(),
            ops: 1_000_000 * scale,
            ours: Box::new(|n| k2k_pair.borrow_mut().one_way(n)),
            base: Box::new(two_thread_rtrb),
        },
        Comparison {
            name: "kameo_tell",
            config: "n tells then one ask that sees them processed: Tell(Add) to a GPU actor vs a native kameo actor; time per tell".into(),
            ops: 200_000 * scale,
            ours: Box::new(|n| kameo_pair.gpu_tells(n)),
            base: Box::new(|n| kameo_pair.native_tells(n)),
        },
        Comparison {
            name: "kameo_tell_vs_handoff",
            config: "as kameo_tell; base: tell to a native kameo actor that hands each message to a thread of its own over a std channel (three threads, as ours)".into(),
            ops: 200_000 * scale,
            ours: Box::new(|n| kameo_pair.gpu_tells(n)),
            base: Box::new(|n| kameo_pair.handoff_tells(n)),
        },
    ];
    let mut failed = Vec::new();
    for c in &mut comparisons {
        if let Some(only) = &only {
            if c.name == only {
                run(c, rounds);
            }
        } else if filter.as_deref().is_none_or(|f| c.name.contains(f)) {
            if in_process {
                run(c, rounds);
            } else if !run_child(c.name, quick) {
                failed.push(c.name);
            }
        }
    }
    if let Some(only) = &only {
        if !comparisons.iter().any(|c| c.name == only) {
            eprintln!("report: no comparison named {only}");
            std::process::exit(2);
        }
        return;
    }
    drop(comparisons);
    if !failed.is_empty() {
        // Finish the report, then fail it.
        eprintln!("report: these comparisons failed: {failed:?}");
        report_failed = true;
    }

    // The wgpu backend, where there is an adapter (lavapipe in CI).
    if filter
        .as_deref()
        .is_none_or(|f| "wgpu_".contains(f) || f.starts_with("wgpu"))
        && let Some(w) = wgpu::WgpuBench::new()
    {
        let w = RefCell::new(w);
        let mut wgpu_comparisons = [
            Comparison {
                name: "wgpu_ask",
                config: "sequential asks (Echo) to a GPU actor on the wgpu backend through the runtime: H2K, a host-driven dispatch, K2H, the poller; base the bare floor: one dispatch of one message with its buffers and readback".into(),
                ops: 300 * scale,
                ours: Box::new(|n| w.borrow_mut().asks(n)),
                base: Box::new(|n| w.borrow_mut().bare_dispatches(n)),
            },
            Comparison {
                name: "wgpu_tell",
                config: "n tells then one ask that sees them, to a Probe actor on the wgpu backend (batches as the loop finds them); base the same on the cpu backend; time per tell".into(),
                ops: 20_000 * scale,
                ours: Box::new(|n| w.borrow_mut().wgpu_tells(n)),
                base: Box::new(|n| w.borrow_mut().cpu_tells(n)),
            },
            Comparison {
                name: "wgpu_tell_two_in_flight",
                config: "n tells then one ask that sees them, to a Probe actor on the wgpu backend with two dispatches in flight (the default: batches of at most half the ring, the next submitted before the last is published) vs a backend keeping one in flight; time per tell".into(),
                ops: 20_000 * scale,
                ours: Box::new(|n| w.borrow_mut().wgpu_tells(n)),
                base: Box::new(|n| w.borrow_mut().serial_tells(n)),
            },
            Comparison {
                name: "wgpu_k2k_forward",
                config: "n tells to a Relay on the wgpu backend, each forwarded as a Seq to a Probe over their K2K link (host-mediated: the dispatch loop moves it between dispatches), in chunks of 1024 (each waited for: asks until the Probe has seen it); base the same sends routed by the poller through the Probe's mailbox (beyond its overflow bound the routed path dead-letters, where the link holds the sender back); time per message".into(),
                ops: 5_000 * scale,
                ours: Box::new(|n| w.borrow_mut().linked_forwards(n)),
                base: Box::new(|n| w.borrow_mut().routed_forwards(n)),
            },
            Comparison {
                name: "wgpu_batch_1024",
                config: "per-message time of dispatches of 1024 Echo messages vs dispatches of 1 (bare device, readback included)".into(),
                ops: 1024,
                ours: Box::new(|n| w.borrow_mut().dispatch_batches(n, 1024)),
                base: Box::new(|n| w.borrow_mut().dispatch_batches(n, 1)),
            },
        ];
        for c in &mut wgpu_comparisons {
            if filter.as_deref().is_none_or(|f| c.name.contains(f)) {
                run(c, rounds);
            }
        }
    }

    // The CUDA device loop: as host C++ everywhere, on a GPU where there is one.
    if filter
        .as_deref()
        .is_none_or(|f| "chost_ask".contains(f) || f.starts_with("chost"))
    {
        let c = RefCell::new(cuda::CHostBench::new());
        let mut comparisons = [
            Comparison {
                name: "chost_ask",
                config: "sequential asks (Echo) to a GPU actor on the c-host backend (the CUDA device loop compiled as host C++, a block thread) vs the same on the cpu backend (the Rust loop)".into(),
                ops: 20_000 * scale,
                ours: Box::new(|n| c.borrow_mut().chost_asks(n)),
                base: Box::new(|n| c.borrow_mut().cpu_asks(n)),
            },
            Comparison {
                name: "chost_k2k_forward",
                config: "n tells to a Relay, each forwarded as a Seq over a K2K link of 256 slots to a Probe, until the Probe has them all: the C loop serving the link in place (c-host) vs the cpu backend's Rust loop; time per message".into(),
                ops: 100_000 * scale,
                ours: Box::new(|n| c.borrow_mut().linked.0.forward(n)),
                base: Box::new(|n| c.borrow_mut().linked.1.forward(n)),
            },
        ];
        for comparison in &mut comparisons {
            if filter
                .as_deref()
                .is_none_or(|f| comparison.name.contains(f))
            {
                run(comparison, rounds);
            }
        }
    }
    if filter
        .as_deref()
        .is_none_or(|f| "cuda_ask".contains(f) || f.starts_with("cuda"))
        && let Some(g) = cuda::GpuBench::new()
    {
        let g = RefCell::new(g);
        let mut c = Comparison {
            name: "cuda_ask",
            config: "sequential asks (Echo) to a GPU actor served by the persistent actor-host kernel (mapped memory; the host's monitor thread polls K2H and wakes the poller) vs a kernel launch per message with the host spinning on the mapped word it writes".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| g.borrow_mut().asks(n)),
            base: Box::new(|n| g.borrow_mut().launches(n)),
        };
        run(&mut c, rounds);
        let mut c = Comparison {
            name: "cuda_k2k_forward",
            config: "n tells to a Relay, each forwarded as a Seq over a K2K link of 256 slots to a Probe, until the Probe has them all: served in place by the actor-host kernel (pinned, mapped link memory) vs the same on the cpu backend; time per message".into(),
            ops: 100_000 * scale,
            ours: Box::new(|n| g.borrow_mut().linked.0.forward(n)),
            base: Box::new(|n| g.borrow_mut().linked.1.forward(n)),
        };
        run(&mut c, rounds);
        let mut c = Comparison {
            name: "cuda_ask_vs_graph",
            config: "sequential asks (Echo) to the persistent actor-host kernel vs a CUDA-graph launch per message (captured once, uploaded), the host spinning on the mapped word it writes".into(),
            ops: 20_000 * scale,
            ours: Box::new(|n| g.borrow_mut().asks(n)),
            base: Box::new(|n| g.borrow_mut().graph_launches(n)),
        };
        run(&mut c, rounds);
    }

    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    // The fault benches make handlers panic on purpose, hundreds of times:
    // keep those (caught, and turned into faults) out of the report.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let device = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("ringkernel-"));
        if !device {
            default_hook(info);
        }
    }));
    if wanted("restart_core") {
        let mut r = faults::CoreRestarts::new();
        let fresh = faults::CoreRestarts::new();
        run_samples(
            "restart_core",
            "a Probe handler panics; from the poller's fault detection to the first reply of the next incarnation (recover + launch_in + ask); base: launching a fresh actor to its first reply",
            100,
            &mut || r.restart(),
            &mut || fresh.fresh_launch(),
        );
    }
    if wanted("restart_ractor") {
        let r = RefCell::new(faults::RactorRestarts::new());
        run_samples(
            "restart_ractor",
            "a GPU actor in a ractor supervision tree panics; from its caller's error to the first reply of the actor the supervisor spawns in its place; base: spawning a fresh GPU actor to its first reply",
            100,
            &mut || r.borrow_mut().restart(),
            &mut || r.borrow().fresh_spawn(),
        );
    }
    // Single asks: their distribution, and after the loop has gone idle.
    let idle = Duration::from_millis(5);
    if wanted("chost_ask_after_idle") {
        let c = RefCell::new(cuda::CHostBench::new());
        run_samples(
            "chost_ask_after_idle",
            "one ask to a GPU actor on the c-host backend after 5 ms of idling (its block thread parked); base: one ask back to back",
            200,
            &mut || c.borrow_mut().chost_ask_after(idle),
            &mut || c.borrow_mut().chost_ask_after(Duration::ZERO),
        );
    }
    if (wanted("cuda_ask_latency") || wanted("cuda_ask_after_idle"))
        && let Some(g) = cuda::GpuBench::new()
    {
        let g = RefCell::new(g);
        run_samples(
            "cuda_ask_latency",
            "one ask to the persistent actor-host kernel (target p50 <= 5 us, p99 reported); base: one message served by a kernel launch of its own, spinning on a mapped flag",
            2000,
            &mut || g.borrow_mut().ask_after(Duration::ZERO),
            &mut || g.borrow_mut().launch_once(),
        );
        run_samples(
            "cuda_ask_after_idle",
            "one ask to the persistent kernel after 5 ms of idling (blocks in __nanosleep back-off); base: one ask back to back",
            200,
            &mut || g.borrow_mut().ask_after(idle),
            &mut || g.borrow_mut().ask_after(Duration::ZERO),
        );
    }
    if wanted("watchdog_detect") {
        let w = faults::WatchdogDetection::new(Duration::from_millis(10));
        let bound = w.limit + w.poll_interval();
        run_samples(
            "watchdog_detect_10ms",
            "a handler hangs with an ask pending behind it; from the hanging ask to the watchdog's fault event, limit 10 ms; base: the bound, limit + one poll interval (2.5 ms), not a measurement",
            20,
            &mut || w.detect(),
            &mut || bound,
        );
    }
    if report_failed {
        std::process::exit(1);
    }
}
