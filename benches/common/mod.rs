//! Shared by the bench targets: the median time of one engine call.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tfmqc_runtime::{Engine, Tensor};

/// Median over `runs` timed calls, after `warmup` untimed ones.
pub fn median_step(
    engine: &Engine,
    inputs: &HashMap<String, Tensor>,
    warmup: usize,
    runs: usize,
) -> Duration {
    for _ in 0..warmup {
        engine.run_named(inputs).unwrap();
    }
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            engine.run_named(inputs).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
