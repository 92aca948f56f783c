//! Tell streams outside the report, for `perf` and for seeing a stream's
//! pace within a round (the report prints one median per comparison).
//!
//! ```sh
//! # actix GPU tells alternating with native ones (as the report does),
//! # each GPU round timed in ten chunks, each chunk ending with an ask:
//! cargo run --release -p ringkernel-bench --example tell_stream -- actix 200000 4
//! # ractor GPU tells and native casts, alternating rounds (as the report
//! # does; under `perf record`, the two show apart by thread and symbol):
//! cargo run --release -p ringkernel-bench --example tell_stream -- ractor 200000 15
//! # one side only, back to back, for `perf` (per-thread CPU, scheduling):
//! # GPU tells, native casts, GPU asks, native calls
//! cargo run --release -p ringkernel-bench --example tell_stream -- ractor-gpu 200000 10
//! cargo run --release -p ringkernel-bench --example tell_stream -- ractor-native 200000 10
//! cargo run --release -p ringkernel-bench --example tell_stream -- ractor-ask 20000 3
//! cargo run --release -p ringkernel-bench --example tell_stream -- ractor-call 20000 3
//! # the same for actix and kameo tells: GPU, native
//! cargo run --release -p ringkernel-bench --example tell_stream -- actix-gpu 200000 10
//! cargo run --release -p ringkernel-bench --example tell_stream -- actix-native 200000 10
//! cargo run --release -p ringkernel-bench --example tell_stream -- kameo-gpu 200000 10
//! cargo run --release -p ringkernel-bench --example tell_stream -- kameo-native 200000 10
//! ```

use ringkernel_bench::actors::{ActixPair, KameoPair, RactorPair};
use std::time::Instant;

/// `rounds` runs of `n` messages through `run`, back to back; prints the
/// time per message.
fn one_sided(what: &str, n: u64, rounds: u64, run: impl Fn(u64)) {
    let t = Instant::now();
    for _ in 0..rounds {
        run(n);
    }
    let per = t.elapsed().as_nanos() as f64 / (n * rounds) as f64;
    println!("{what}: {per:.1} ns per message");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map_or("actix", String::as_str);
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let rounds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    match what {
        "ractor" => {
            let pair = RactorPair::new();
            pair.gpu_tells(10_000);
            for round in 0..rounds {
                let t = Instant::now();
                pair.gpu_tells(n);
                let gpu = t.elapsed().as_nanos() as f64 / n as f64;
                let t = Instant::now();
                pair.native_casts(n);
                let native = t.elapsed().as_nanos() as f64 / n as f64;
                println!(
                    "round {round}: GPU {gpu:.1} ns per tell; native {native:.1} ns per cast; ratio {:.2}",
                    gpu / native
                );
            }
        }
        "ractor-gpu" | "ractor-native" | "ractor-ask" | "ractor-call" => {
            let pair = RactorPair::new();
            pair.gpu_tells(10_000);
            one_sided(what, n, rounds, |n| match what {
                "ractor-gpu" => pair.gpu_tells(n),
                "ractor-native" => pair.native_casts(n),
                "ractor-ask" => pair.gpu_asks(n),
                _ => pair.native_calls(n),
            });
        }
        "kameo-gpu" | "kameo-native" => {
            let pair = KameoPair::new();
            pair.gpu_tells(10_000);
            one_sided(what, n, rounds, |n| match what {
                "kameo-gpu" => pair.gpu_tells(n),
                _ => pair.native_tells(n),
            });
        }
        "actix-gpu" | "actix-native" => {
            let pair = ActixPair::new();
            pair.gpu_tells(10_000);
            one_sided(what, n, rounds, |n| match what {
                "actix-gpu" => pair.gpu_tells(n),
                _ => pair.native_tells(n),
            });
        }
        _ => {
            let pair = ActixPair::new();
            let chunk = (n / 10).max(1);
            for round in 0..rounds {
                let chunks: Vec<u64> = (0..10)
                    .map(|_| {
                        let t = Instant::now();
                        pair.gpu_tells(chunk);
                        t.elapsed().as_nanos() as u64 / chunk
                    })
                    .collect();
                let t = Instant::now();
                pair.native_tells(n);
                let native = t.elapsed().as_nanos() as u64 / n;
                println!(
                    "round {round}: GPU chunks {chunks:?} ns per tell; native {native} ns per tell"
                );
            }
        }
    }
}
